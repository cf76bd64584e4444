"""Per-model tokenizers fetched from workers over VllmEngine.GetTokenizer.

Gateway hosts need no model files: the first worker of a model hands over its
tokenizer bundle (a zip with the tokenizer and chat template), verified by SHA-256
and cached on disk by digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import threading
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
from smg_grpc_proto import vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2

from kvmesh.core.errors import InvalidRequestError, NoWorkerAvailableError
from kvmesh.core.grpc_util import internal_channel
from kvmesh.core.service_main import freezing_imports

log = logging.getLogger(__name__)
FETCH_TIMEOUT_S = 60.0
#: Words a BPE encoder remembers the merges of (tokenizers' default: 10,000). Prompts
#: that share long prefixes repeat their words request after request; a hot set of
#: 32 × 2,048-token prefixes has more distinct words than the default keeps, so every
#: prompt was merged again in full (8.0 → 6.5 ms per 2,400-token prompt with this).
ENCODER_CACHE_WORDS = 100_000


@dataclass
class ModelTokenizer:
    """A model's tokenizer: chat template rendering and (de)tokenization."""

    hf: Any  # transformers PreTrainedTokenizerBase
    #: The unpacked bundle (tokenizer files, config.json, processor configs).
    folder: Path | None = None

    @cached_property
    def model_config(self) -> dict[str, Any]:
        """The model's ``config.json`` from the bundle ({} when it has none)."""
        path = self.folder / "config.json" if self.folder else None
        if path is None or not path.is_file():
            return {}
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}

    @property
    def backend(self) -> Any:
        """The fast ``tokenizers.Tokenizer`` (for incremental decoding)."""
        return self.hf.backend_tokenizer

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        try:
            rendered = self.hf.apply_chat_template(
                messages, tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja errors, missing template
            raise InvalidRequestError(f"chat template failed: {exc}", param="messages") from exc
        return str(rendered)

    def render_and_encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        """The chat prompt and its token ids (the template adds the special tokens)."""
        text = self.render_chat(messages, add_generation_prompt, tools)
        return text, self.encode(text, add_special_tokens=False)

    @cached_property
    def encoder(self) -> Any:
        """A copy of the Rust tokenizer that neither truncates nor pads: a model's
        tokenizer.json may carry both (all-MiniLM-L6-v2: truncate and pad to 128), which
        transformers switches off on every call of its own."""
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(self.backend.to_str())
        encoder.no_truncation()
        encoder.no_padding()
        resize = getattr(encoder.model, "_resize_cache", None)  # BPE models only
        if resize is not None:
            resize(ENCODER_CACHE_WORDS)
        return encoder

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """The ids transformers' ``encode`` gives, straight from the Rust tokenizer (its
        post-processor adds the special tokens), without transformers' Python layer and
        without the character offsets nobody here reads (``encode_batch_fast``)."""
        return self.encode_batch([text], add_special_tokens)[0]

    @cached_property
    def processor(self) -> Any:
        """The model's transformers processor (vision-language models), else None."""
        folder = self.folder
        if folder is None or not any(
            (folder / name).is_file()
            for name in ("processor_config.json", "preprocessor_config.json")
        ):
            return None
        with _LOAD_LOCK, freezing_imports():
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(str(folder))

    @property
    def image_token_id(self) -> int:
        processor = self.processor
        token_id = getattr(processor, "image_token_id", None)
        if token_id is None:
            token_id = self.hf.convert_tokens_to_ids(processor.image_token)
        return int(token_id)

    def process_images(self, text: str, images: list[Any]) -> tuple[list[int], dict[str, Any]]:
        """Expanded prompt ids and pixel tensors (numpy, batch dimension removed)."""
        out = self.processor(text=[text], images=[images], return_tensors="np",
                             add_special_tokens=False)
        ids = [int(t) for t in out["input_ids"][0]]
        tensors = {k: v[0] for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        return ids, tensors

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        return [list(e.ids) for e in
                self.encoder.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=True))

    @property
    def vocab_size(self) -> int:
        """Token ids the model knows (added tokens included)."""
        return len(self.hf)

    def token_text(self, token_id: int) -> str:
        """One token as text, the way vLLM's logprobs show it."""
        token = self.hf.convert_ids_to_tokens(token_id)
        return str(self.hf.convert_tokens_to_string([token])) if token is not None else ""


async def fetch_bundle(endpoint: str) -> tuple[bytes, str]:
    """Stream a worker's tokenizer zip; return (bytes, sha256)."""
    async with internal_channel(endpoint) as channel:
        stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        parts: list[bytes] = []
        digest = ""
        async for chunk in stub.GetTokenizer(
            common_pb2.GetTokenizerRequest(), timeout=FETCH_TIMEOUT_S
        ):
            parts.append(chunk.data)
            digest = chunk.sha256 or digest
    data = b"".join(parts)
    actual = hashlib.sha256(data).hexdigest()
    if digest and digest != actual:
        raise ValueError(f"tokenizer bundle from {endpoint} is corrupt (sha256 mismatch)")
    return data, actual


def unpack_bundle(data: bytes, digest: str, cache_dir: Path) -> Path:
    target = cache_dir / digest
    if (target / ".complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            if "/" in name or name.startswith("."):
                raise ValueError(f"unexpected path {name!r} in tokenizer bundle")
        archive.extractall(target)
    (target / ".complete").touch()
    return target


#: transformers resolves classes through lazy imports that are not thread-safe: two
#: models loading at once in worker threads fail with "cannot import name
#: 'AutoTokenizer'". Loads are rare (once per model), so they take turns.
_LOAD_LOCK = threading.Lock()


def load_tokenizer(folder: Path) -> ModelTokenizer:
    with _LOAD_LOCK, freezing_imports():  # transformers brings torch: out of gc's walks
        from transformers import AutoTokenizer

        tokenizer = ModelTokenizer(AutoTokenizer.from_pretrained(str(folder)), folder)
    tokenizer.encoder  # noqa: B018 - built here (~120 ms), not by the first request
    return tokenizer


class TokenizerStore:
    """One tokenizer per model, loaded once (concurrent callers share the load)."""

    def __init__(self, cache_dir: Path) -> None:
        self._cache_dir = cache_dir
        self._loads: dict[str, asyncio.Task[ModelTokenizer]] = {}

    def prefetch(self, model: str, endpoints: list[str]) -> None:
        """Start loading unless a load is running or succeeded (a failed one retries)."""
        task = self._loads.get(model)
        if task is None or (task.done() and task.exception() is not None):
            self._loads[model] = asyncio.create_task(self._load(model, endpoints))

    async def get(self, model: str, endpoints: list[str]) -> ModelTokenizer:
        self.prefetch(model, endpoints)
        return await asyncio.shield(self._loads[model])

    def forget(self, model: str) -> None:
        """The model is no longer served: a pool added later under its name may run
        other weights, so its tokenizer is fetched again then."""
        self._loads.pop(model, None)  # a load in flight still answers who awaits it

    def ready(self, model: str) -> bool:
        task = self._loads.get(model)
        return task is not None and task.done() and task.exception() is None

    async def _load(self, model: str, endpoints: list[str]) -> ModelTokenizer:
        last: Exception | None = None
        for endpoint in endpoints:
            try:
                data, digest = await fetch_bundle(endpoint)
                folder = await asyncio.to_thread(
                    unpack_bundle, data, digest, self._cache_dir
                )
                tokenizer = await asyncio.to_thread(load_tokenizer, folder)
                log.info("tokenizer for %s loaded from %s (%s)", model, endpoint, digest[:12])
                return tokenizer
            except (grpc.aio.AioRpcError, ValueError, OSError, ImportError) as exc:
                log.warning("tokenizer of %s from %s failed: %s", model, endpoint, exc)
                last = exc
        raise NoWorkerAvailableError(f"could not load the tokenizer of {model!r}: {last}")
