"""Images in chat messages → MultimodalInputs protobuf (pure parts of the vision path)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.schemas import ChatCompletionRequest
from kvmesh.gateway.vision import image_bytes, multimodal_inputs, open_image, token_runs

pytestmark = pytest.mark.unit
IMG = 9  # image token id in the synthetic prompts below


def png(width: int = 20, height: int = 10, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_data_urls_decode_and_bad_ones_are_400() -> None:
    raw = png()
    assert image_bytes(data_url(raw), None) == raw
    assert open_image(raw).size == (20, 10)
    for bad in ("data:text/plain;base64,aGk=", "data:image/png;base64,@@@",
                "data:image/png,rawbytes"):
        with pytest.raises(InvalidRequestError):
            image_bytes(bad, None)
    with pytest.raises(InvalidRequestError, match="cannot decode image"):
        open_image(b"not an image")


def test_no_network_and_local_files_only_under_the_allowed_dir(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="does not fetch images over the network"):
        image_bytes("https://example.com/cat.png", tmp_path)
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png(seed=1))
    (tmp_path / "secret.png").write_bytes(png(seed=2))
    with pytest.raises(InvalidRequestError, match="local image files are disabled"):
        image_bytes(f"file://{allowed}/a.png", None)
    assert image_bytes(f"file://{allowed}/a.png", allowed) == png(seed=1)
    assert image_bytes(str(allowed / "a.png"), allowed) == png(seed=1)
    for outside in (f"file://{tmp_path}/secret.png", f"file://{allowed}/../secret.png"):
        with pytest.raises(InvalidRequestError, match="outside the allowed directory"):
            image_bytes(outside, allowed)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        image_bytes(f"file://{allowed}/missing.png", allowed)


def test_token_runs() -> None:
    assert token_runs([1, IMG, IMG, 2, IMG, 3], IMG) == [(1, 2), (4, 1)]
    assert token_runs([IMG, IMG], IMG) == [(0, 2)]
    assert token_runs([1, 2], IMG) == []


def test_two_images_become_placeholders_tensors_and_hashes() -> None:
    # <fake><global><img>x4<fake> text <fake><global><img>x4<fake>, as Idefics3 expands.
    ids = [1, 7, 8, *[IMG] * 4, 7, 5, 5, 7, 8, *[IMG] * 4, 7, 2]
    rng = np.random.default_rng(0)
    tensors = {
        "pixel_values": rng.random((2, 3, 8, 8), dtype=np.float32),
        "pixel_attention_mask": np.ones((2, 8, 8), dtype=np.int64),
    }
    mm = multimodal_inputs(ids, tensors, IMG, 2)
    assert [(p.offset, p.length) for p in mm.mm_placeholders] == [(3, 4), (12, 4)]
    assert mm.im_token_id == IMG
    assert list(mm.pixel_values.shape) == [2, 3, 8, 8] and mm.pixel_values.dtype == "float32"
    pixels = np.frombuffer(mm.pixel_values.inline, dtype="<f4").reshape(2, 3, 8, 8)
    assert np.array_equal(pixels, tensors["pixel_values"])
    mask = mm.model_specific_tensors["pixel_attention_mask"]
    assert list(mask.shape) == [2, 8, 8] and mask.dtype == "int64"
    patches = mm.model_specific_tensors["num_patches"]
    assert np.frombuffer(patches.inline, dtype="<i8").tolist() == [1, 1]
    assert dict(mm.flat_keys) == {"pixel_values": "num_patches",
                                  "pixel_attention_mask": "num_patches"}
    assert list(mm.batched_keys) == ["num_patches"] == list(mm.keep_on_cpu_keys)
    assert len(mm.mm_hashes) == 2 and mm.mm_hashes[0] != mm.mm_hashes[1]


def test_tiles_of_one_image_share_one_placeholder() -> None:
    # One image split into two tiles: two runs, one placeholder spanning both.
    ids = [1, *[IMG] * 2, 7, *[IMG] * 2, 2]
    tensors = {"pixel_values": np.zeros((2, 3, 4, 4), dtype=np.float32)}
    mm = multimodal_inputs(ids, tensors, IMG, 1)
    assert [(p.offset, p.length) for p in mm.mm_placeholders] == [(1, 5)]
    assert np.frombuffer(mm.model_specific_tensors["num_patches"].inline, "<i8").tolist() == [2]


def test_processor_output_that_does_not_match_the_images_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        multimodal_inputs([1, IMG, 2], {"pixel_values": np.zeros((1, 3, 4, 4))}, IMG, 2)
    with pytest.raises(InvalidRequestError):
        multimodal_inputs([1, IMG, 2], {"pixel_values": np.zeros((3, 3, 4, 4))}, IMG, 1)


def test_chat_schema_takes_image_url_parts() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "?"}]}]})
    system, user = req.messages
    assert system.image_urls() == [] and system.template_content() == "Be brief."
    assert user.image_urls() == ["data:image/png;base64,AAAA"]
    assert user.text() == "What is ?"
    assert user.template_content() == [
        {"type": "text", "text": "What is "}, {"type": "image"}, {"type": "text", "text": "?"}]
