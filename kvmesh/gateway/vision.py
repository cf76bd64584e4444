"""Images in chat messages → the worker's preprocessed multimodal protobuf (pure).

The gateway runs the model's own transformers processor (the one in the tokenizer
bundle the worker hands out) and sends what it produced: expanded prompt ids plus
pixel tensors in ``VllmEngine``'s ``MultimodalInputs`` — vLLM's servicer feeds them to
the engine without running a processor itself. No network fetch: ``data:`` URLs, and
local files only under a directory the operator allows.

The tensor layout (which keys are per image, which are flat per tile) is the one vLLM
uses for the Idefics3/SmolVLM family, the family served on CPU here (see
``kvmesh/models/tiny_vlm.py`` for why).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from smg_grpc_proto import vllm_engine_pb2

from kvmesh.core.errors import InvalidRequestError

#: Keys vLLM's Idefics3 processor slices per tile (``flat_from_sizes`` by num_patches).
FLAT_KEYS = ("pixel_values", "pixel_attention_mask")
_DTYPES = {np.dtype("float32"): "float32", np.dtype("float16"): "float16",
           np.dtype("int64"): "int64", np.dtype("uint32"): "uint32"}


def image_bytes(url: str, allowed_local_dir: Path | None) -> bytes:
    """The encoded image an ``image_url`` part points at (data URL or allowed file)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not header.startswith("data:image/"):
            raise InvalidRequestError(
                "image data URLs must look like data:image/<type>;base64,<data>",
                param="messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequestError(f"invalid base64 image data: {exc}",
                                      param="messages") from exc
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise InvalidRequestError(
            "the gateway does not fetch images over the network; send a data: URL "
            "(or a file:// URL under the gateway's allowed_local_media_path)",
            param="messages")
    if parsed.scheme not in ("file", ""):
        raise InvalidRequestError(f"unsupported image URL scheme {parsed.scheme!r}",
                                  param="messages")
    if allowed_local_dir is None:
        raise InvalidRequestError(
            "local image files are disabled on this gateway (set allowed_local_media_path)",
            param="messages")
    path = Path(unquote(parsed.path)).resolve()
    if not path.is_relative_to(allowed_local_dir.resolve()):
        raise InvalidRequestError(
            f"image file {path} is outside the allowed directory", param="messages")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read image file {path}: {exc.strerror}",
                                  param="messages") from exc


def open_image(data: bytes) -> Any:
    """A decoded RGB PIL image, or a 400."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequestError(f"cannot decode image: {exc}", param="messages") from exc
    return image.convert("RGB")


def tensor_data(array: np.ndarray) -> vllm_engine_pb2.TensorData:
    array = np.ascontiguousarray(array)
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:
        array = array.astype(np.float32 if array.dtype.kind == "f" else np.int64)
        dtype = _DTYPES[array.dtype]
    little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return vllm_engine_pb2.TensorData(
        shape=list(array.shape), dtype=dtype, inline=little_endian.tobytes())


def token_runs(ids: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each maximal run of ``token_id`` in ``ids``."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*ids, -1]):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def multimodal_inputs(
    ids: Sequence[int],
    processed: Mapping[str, np.ndarray],
    image_token_id: int,
    n_images: int,
) -> vllm_engine_pb2.MultimodalInputs:
    """The processor's output for one prompt (batch dimension removed) as protobuf.

    Each image owns one run of image tokens per tile (one tile without image
    splitting); its placeholder spans its first to last run and vLLM scatters the
    encoder output into the image-token positions only (``im_token_id``).
    """
    runs = token_runs(ids, image_token_id)
    if n_images == 0 or len(runs) % n_images:
        raise InvalidRequestError(
            f"the processor produced {len(runs)} image-token runs for {n_images} image(s)",
            param="messages")
    per_image = len(runs) // n_images
    pixel_values = processed["pixel_values"]
    if pixel_values.shape[0] != len(runs):
        raise InvalidRequestError(
            f"the processor produced {pixel_values.shape[0]} tiles for {len(runs)} image "
            "placeholders", param="messages")
    placeholders = []
    hashes = []
    for i in range(n_images):
        first = runs[i * per_image]
        last = runs[(i + 1) * per_image - 1]
        placeholders.append(vllm_engine_pb2.PlaceholderRange(
            offset=first[0], length=last[0] + last[1] - first[0]))
        tiles = pixel_values[i * per_image:(i + 1) * per_image]
        hashes.append(hashlib.sha256(np.ascontiguousarray(tiles).tobytes()).hexdigest())
    num_patches = np.full(n_images, per_image, dtype=np.int64)
    tensors = {k: tensor_data(processed[k]) for k in FLAT_KEYS[1:] if k in processed}
    tensors["num_patches"] = tensor_data(num_patches)
    return vllm_engine_pb2.MultimodalInputs(
        pixel_values=tensor_data(pixel_values),
        model_specific_tensors=tensors,
        im_token_id=image_token_id,
        mm_placeholders=placeholders,
        mm_hashes=hashes,
        batched_keys=["num_patches"],
        flat_keys={k: "num_patches" for k in FLAT_KEYS if k in processed},
        keep_on_cpu_keys=["num_patches"],
    )
