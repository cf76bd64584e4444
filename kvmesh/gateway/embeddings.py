"""Embeddings: OpenAI request fields ⇄ what a worker's ``VllmEngine.Embed`` returns.

Pure: no grpc calls, no I/O. The worker runs the model's pooler (vLLM's
``PoolingParams(task="embed")``: the sentence-transformers pooling + normalization);
``Embed`` carries no output size, so ``dimensions`` is applied here exactly as vLLM's
pooler applies it to Matryoshka models — truncate, then L2-normalize — with vLLM's
validation rules and messages.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvmesh.core.errors import InvalidRequestError

#: OpenAI's limit on the number of inputs in one embeddings request.
MAX_INPUTS = 2048


@dataclass(frozen=True)
class EmbeddingModelInfo:
    """What the gateway reads from an embedding model's ``config.json``."""

    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    hidden_size: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EmbeddingModelInfo:
        """The same attributes vLLM's ``ModelConfig.is_matryoshka`` reads."""
        dims = config.get("matryoshka_dimensions")
        hidden = config.get("hidden_size")
        return cls(
            is_matryoshka=bool(dims) or bool(config.get("is_matryoshka", False)),
            matryoshka_dimensions=tuple(int(d) for d in dims) if dims else None,
            hidden_size=int(hidden) if isinstance(hidden, int) else None,
        )


def split_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One item per embedding: a text or a token-id array."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequestError("input must not be empty", param="input")
    if isinstance(value[0], int):
        return [list(value)]  # type: ignore[arg-type]
    if len(value) > MAX_INPUTS:
        raise InvalidRequestError(
            f"input has {len(value)} items; at most {MAX_INPUTS} are allowed", param="input"
        )
    items: list[str | list[int]] = []
    for item in value:
        if isinstance(item, list) and not item:
            raise InvalidRequestError("a token-id array in input is empty", param="input")
        items.append(item if isinstance(item, str) else list(item))  # type: ignore[arg-type]
    return items


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Token-id inputs must name tokens of the model's vocabulary."""
    if any(t < 0 or t >= vocab_size for t in ids):
        raise InvalidRequestError(
            f"input token ids must be in [0, {vocab_size})", param="input")


def check_input_length(n_tokens: int, context_len: int) -> None:
    """vLLM's error for an input longer than the model's context."""
    if n_tokens > context_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_len} tokens. However, you "
            f"requested {n_tokens} tokens in the input for embedding generation. Please "
            "reduce the length of the input.",
            param="input",
        )


def check_dimensions(dimensions: int | None, model: str, info: EmbeddingModelInfo) -> None:
    """Reject ``dimensions`` the model cannot honour, before any work is done."""
    if dimensions is None:
        return
    if not info.is_matryoshka:
        raise InvalidRequestError(
            f"Model {model!r} does not support Matryoshka embeddings; dimensions must be "
            f"unset (received dimensions={dimensions}).",
            param="dimensions",
        )
    if info.hidden_size is not None:
        check_dimensions_range(dimensions, model, info.hidden_size)
    if info.matryoshka_dimensions is not None and dimensions not in info.matryoshka_dimensions:
        raise InvalidRequestError(
            f"Model {model!r} only supports Matryoshka dimensions "
            f"{list(info.matryoshka_dimensions)}, got {dimensions}.",
            param="dimensions",
        )


def check_dimensions_range(dimensions: int, model: str, embedding_size: int) -> None:
    if not 1 <= dimensions <= embedding_size:
        raise InvalidRequestError(
            f"Model {model!r} only supports dimensions in range [1, {embedding_size}], "
            f"got {dimensions}.",
            param="dimensions",
        )


def shape_embedding(values: Sequence[float], dimensions: int | None, model: str) -> np.ndarray:
    """The worker's (normalized) vector, cut to ``dimensions`` and re-normalized."""
    vector = np.asarray(values, dtype=np.float32)
    if dimensions is None:
        return vector
    check_dimensions_range(dimensions, model, len(vector))
    cut = vector[:dimensions]
    norm = float(np.linalg.norm(cut))
    return cut / norm if norm > 0 else cut


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """'float': a JSON list; 'base64': little-endian float32 bytes (OpenAI's format)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
