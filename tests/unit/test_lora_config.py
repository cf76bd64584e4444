"""LoRA as a user writes it (config, `kvmesh up` flags) and as a request names it
(the gateway's model catalog)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvmesh.cli import build_parser
from kvmesh.core.config import load_settings
from kvmesh.core.errors import InvalidRequestError, ModelNotFoundError
from kvmesh.core.lora_config import LoraConfig, parse_lora_module, split_model_field
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.gateway.catalog import ModelCatalog
from kvmesh.v1 import common_pb2, router_pb2

pytestmark = pytest.mark.unit


def test_lora_config_defaults_and_checks() -> None:
    config = LoraConfig(adapters={"sql": "s3://bucket/sql"})
    assert config.enable_lora and config.slots == 1
    assert LoraConfig(max_loras=2, max_cpu_loras=4).slots == 4
    assert LoraConfig(enable_lora=False).slots == 0
    with pytest.raises(ValidationError, match="max_cpu_loras"):
        LoraConfig(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValidationError, match="max_lora_rank"):
        LoraConfig(max_lora_rank=12)
    with pytest.raises(ValidationError, match="without ':'"):
        LoraConfig(adapters={"a:b": "/x"})
    with pytest.raises(ValidationError, match="empty source"):
        LoraConfig(adapters={"a": " "})
    with pytest.raises(ValidationError, match="max_lora"):
        LoraConfig(max_lora=2)  # type: ignore[call-arg]  # unknown keys are named


def test_lora_modules_as_vllm_serve_takes_them() -> None:
    assert parse_lora_module("sql=/models/sql") == ("sql", "/models/sql")
    assert parse_lora_module("x=s3://b/p=q") == ("x", "s3://b/p=q")
    assert parse_lora_module('{"name": "sql", "path": "gs://b/sql"}') == ("sql", "gs://b/sql")
    for bad in ("sql", "=path", '{"name": 1}', "{nope"):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_module(bad)


def test_up_flags_become_the_engine_lora_section() -> None:
    args = build_parser().parse_args([
        "up", "--enable-lora", "--lora-modules", "sql=/a/sql", "poet=hf://org/poet",
        "--max-loras", "2", "--max-lora-rank", "8", "--workers", "2"])
    from kvmesh.cli import _lora

    config = load_settings(MeshConfig, None, worker={"engine": {"lora": _lora(args)}})
    lora = config.worker.engine.lora
    assert lora is not None and lora.enable_lora and lora.max_loras == 2
    assert lora.max_lora_rank == 8
    assert lora.adapters == {"sql": "/a/sql", "poet": "hf://org/poet"}
    none = build_parser().parse_args(["up"])
    assert _lora(none) is None


def test_a_bad_lora_module_flag_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--lora-modules", "nopath"])
    assert "expected NAME=PATH_OR_URI" in capsys.readouterr().err


def test_split_model_field() -> None:
    assert split_model_field("base:sql") == ("base", "sql")
    assert split_model_field("org/model") == ("org/model", "")
    assert split_model_field("base:") == ("base:", "")


def catalog(*workers: common_pb2.WorkerInfo) -> ModelCatalog:
    c = ModelCatalog()
    c.apply(router_pb2.WorkerSet(workers=list(workers), version=1))
    return c


def test_catalog_resolves_base_adapter_and_plain_names() -> None:
    c = catalog(
        common_pb2.WorkerInfo(worker_id="w0", endpoint="e0", model="m",
                              servable_adapters=["sql"], lora_slots=1),
        common_pb2.WorkerInfo(worker_id="w1", endpoint="e1", model="m",
                              servable_adapters=["poet", "sql"], lora_slots=1),
        common_pb2.WorkerInfo(worker_id="w2", endpoint="e2", model="llama3:8b"),
    )
    assert c.resolve("m").adapter == "" and c.resolve("m").entry.name == "m"
    assert (c.resolve("m:sql").entry.name, c.resolve("m:sql").adapter) == ("m", "sql")
    assert (c.resolve("poet").entry.name, c.resolve("poet").adapter) == ("m", "poet")
    assert c.resolve("llama3:8b").entry.name == "llama3:8b"  # a model name with ':'
    with pytest.raises(ModelNotFoundError, match="`m` has no LoRA adapter `nope`"):
        c.resolve("m:nope")
    with pytest.raises(ModelNotFoundError, match="`nope` does not exist"):
        c.resolve("nope")
    assert [(i, p) for i, p, _ in c.cards()] == [
        ("llama3:8b", ""), ("m", ""), ("poet", "m"), ("sql", "m")]
    assert c.get("m").lora_endpoints == ["e0", "e1"]
    c.adapter_added("m", "chef")
    assert c.resolve("chef").adapter == "chef" and "m:chef" in c.model_ids()
    c.adapter_removed("m", "chef")
    with pytest.raises(ModelNotFoundError):
        c.resolve("chef")


def test_an_adapter_name_two_models_share_needs_its_base() -> None:
    c = catalog(
        common_pb2.WorkerInfo(worker_id="w0", endpoint="e0", model="m1",
                              servable_adapters=["sql"]),
        common_pb2.WorkerInfo(worker_id="w1", endpoint="e1", model="m2",
                              servable_adapters=["sql"]),
    )
    with pytest.raises(InvalidRequestError, match="`base:sql`"):
        c.resolve("sql")
    assert c.resolve("m2:sql").entry.name == "m2"
