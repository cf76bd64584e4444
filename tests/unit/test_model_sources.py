"""Which source serves a reference, the names models are served under, and the Hugging
Face source against a local HF cache in offline mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.models.hf import HfModelSource, parse_hf_ref
from kvmesh.models.source import (
    BucketModelSource,
    LocalModelSource,
    resolve_model,
    served_name,
    source_for,
)
from tests.object_stores import populate_hf_cache

pytestmark = pytest.mark.unit
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache, offline: what HF_HOME + HF_HUB_OFFLINE=1 give a process."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_each_reference_has_its_source(tiny_model: Path) -> None:
    assert isinstance(source_for("s3://bucket/models/smol"), BucketModelSource)
    assert isinstance(source_for("gs://bucket/models/smol"), BucketModelSource)
    assert isinstance(source_for("hf://org/name@v1"), HfModelSource)
    for local in ("embedded", "SmolLM2-135M-Instruct", "tiny-vlm", str(tiny_model)):
        assert isinstance(source_for(local), LocalModelSource), local
    assert resolve_model(str(tiny_model)) == tiny_model.resolve()
    with pytest.raises(ModelNotFoundError, match="unknown scheme"):
        source_for("ftp://host/model")


def test_served_names() -> None:
    assert served_name("embedded", Path("/c/SmolLM2-135M-Instruct")) == "SmolLM2-135M-Instruct"
    assert served_name("s3://bucket/models/smol/", Path("/c/s3--x")) == "smol"
    assert served_name("gs://bucket/adapter", Path("/c/gs--x")) == "adapter"
    assert served_name("hf://org/name@v2", Path(f"/hf/snapshots/{COMMIT}")) == "org/name"
    assert served_name("org/name", Path(f"/hf/snapshots/{COMMIT}")) == "org/name"
    assert served_name("/models/mine", Path("/models/mine")) == "mine"


def test_hub_references() -> None:
    assert parse_hf_ref("hf://HuggingFaceTB/SmolLM2-135M-Instruct@main") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "main")
    assert parse_hf_ref("org/name") == ("org/name", None)
    assert parse_hf_ref("just-a-name") is None and parse_hf_ref("a/b/c") is None
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face repo id"):
        parse_hf_ref("hf://../etc")


def test_hub_model_from_the_offline_cache(hf_cache: Path, tiny_model: Path) -> None:
    snapshot = populate_hf_cache(hf_cache, "kvmesh-test/tiny", tiny_model, COMMIT)
    for ref in ("hf://kvmesh-test/tiny", "hf://kvmesh-test/tiny@main",
                f"hf://kvmesh-test/tiny@{COMMIT}", "kvmesh-test/tiny"):
        path = resolve_model(ref)
        assert path == snapshot, ref
    assert json.loads((path / "config.json").read_text()) == {"model_type": "llama"}


def test_offline_with_nothing_cached_says_so(hf_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("hf://kvmesh-test/absent")
    assert "offline mode (HF_HUB_OFFLINE=1)" in info.value.message
    assert str(hf_cache) in info.value.message
    # A bare org/name could also have been a local folder: the message says both.
    with pytest.raises(ModelNotFoundError, match="not a local model folder; as a Hugging "
                       "Face repo: kvmesh-test/absent: offline mode"):
        resolve_model("kvmesh-test/absent")


def test_a_hub_repo_that_is_no_model_is_refused(hf_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text("a,b\n")
    populate_hf_cache(hf_cache, "kvmesh-test/data", folder)
    with pytest.raises(ModelNotFoundError, match="not a model or LoRA adapter repo"):
        resolve_model("hf://kvmesh-test/data")
