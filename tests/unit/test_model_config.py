"""Several models in one mesh: the typed per-model config, the shorthand it replaces,
the worker pools planned from it, and faults named by key before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvmesh.core.config import load_settings
from kvmesh.core.errors import InvalidRequestError
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.model_config import ModelConfig
from kvmesh.core.validation import describe, fault_lines
from kvmesh.launch.admin import parse_model
from kvmesh.launch.pools import check_cpus, plan_added_pool, plan_pools

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "multi-model.yaml"

TWO_MODELS = {
    "worker": {"engine": {"block_size": 32, "max_num_seqs": 16}, "num_gpus": 0.25},
    "embeddings": {"workers": 0},
    "models": [
        {"model_id": "a", "source": "embedded", "workers": {"both": 2},
         "resources": {"num_cpus": 0.5, "resources": {"pool": 1}}},
        {"model_id": "b", "source": "/models/b", "engine": {"max_model_len": 1024},
         "workers": {"both": 0, "prefill": 1, "decode": 1}, "policy": "round_robin",
         "decode_engine": {"max_num_seqs": 64}},
    ],
}


def faults(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return "\n".join(fault_lines(exc.value))


def test_the_single_model_keys_are_one_entry_of_models(tmp_path: Path) -> None:
    shorthand = MeshConfig(workers=2, worker={"engine": {"model": "/m/x", "block_size": 32,
                                                         "served_model_name": "x"}})
    (chat, emb) = shorthand.model_configs()
    assert (chat.model_id, chat.source, chat.workers.both) == ("x", "/m/x", 2)
    assert emb.pooling and emb.source == "embedded-embedding"
    listed = MeshConfig(worker={"engine": {"block_size": 32}}, models=[
        {"model_id": "x", "source": "/m/x", "workers": {"both": 2}}])
    a = [w.model_dump() for p in plan_pools(shorthand, "r:1", tmp_path, 2) for w in p.workers]
    b = [w.model_dump() for p in plan_pools(listed, "r:1", tmp_path, 2) for w in p.workers]
    # Same workers either way, but for their names (the shorthand's model has no index).
    assert [dict(w, worker_id=None) for w in a] == [dict(w, worker_id=None) for w in b]


def test_each_model_gets_its_own_pool(tmp_path: Path) -> None:
    pools = plan_pools(MeshConfig.model_validate(TWO_MODELS), "r:1", tmp_path, ncpus=4)
    a, b = pools
    assert [w.engine.served_model_name for w in a.workers] == ["a", "a"]
    assert [(w.role.value, w.engine.model) for w in b.workers] == [
        ("prefill", "/models/b"), ("decode", "/models/b")]
    # engine: the model's keys over the template's; decode_engine over the model's.
    assert [w.engine.max_model_len for w in a.workers + b.workers] == [4096, 4096, 1024, 1024]
    assert [w.engine.max_num_seqs for w in b.workers] == [16, 64]
    assert all(w.engine.block_size == 32 for w in a.workers + b.workers)
    # resources: as configured (fractions kept), else the template's; policy per model.
    assert [(w.num_cpus, w.num_gpus, w.resources) for w in a.workers] == [
        (0.5, 0.25, {"pool": 1})] * 2
    assert [(w.num_cpus, w.resources) for w in b.workers] == [(1.0, {}), (1.0, {})]
    assert [w.routing_policy for w in a.workers + b.workers] == [
        None, None, "round_robin", "round_robin"]
    # Generative workers bind disjoint cores across models.
    assert [w.cpu_bind for w in a.workers + b.workers] == ["0", "1", "2", "3"]


def test_unsized_workers_share_what_sized_ones_leave(tmp_path: Path) -> None:
    config = load_settings(MeshConfig, EXAMPLE)
    workers = [w for p in plan_pools(config, "r:1", tmp_path, ncpus=2) for w in p.workers]
    assert [w.num_cpus for w in workers] == [0.5, 0.5, 1.0]
    assert [w.cpu_bind for w in workers] == ["0", "1", "0-1"]  # embeddings share every core
    check_cpus(workers, 2, "this machine")
    with pytest.raises(InvalidRequestError, match="ask for 2 Ray CPUs.*has 1.5"):
        check_cpus(workers, 1.5, "the mesh's Ray")


def test_a_model_added_while_running_takes_a_share_of_the_free_cpus(tmp_path: Path) -> None:
    config = MeshConfig(worker={"num_cpus": 1.0})
    model = ModelConfig(model_id="late", workers={"both": 3})
    pool = plan_added_pool(config, model, "r:1", tmp_path, free_cpus=0.6, bound=2, ncpus=2)
    assert [w.num_cpus for w in pool.workers] == pytest.approx([0.2] * 3)
    assert [w.cpu_bind for w in pool.workers] == ["0", "1", "0"]  # after 2 bound: round-robin
    sized = ModelConfig(model_id="late", resources={"num_cpus": 0.5})
    assert plan_added_pool(config, sized, "r:1", tmp_path, 0.6, 0, 2).workers[0].num_cpus == 0.5


def test_the_example_serves_two_generative_models_and_embeddings() -> None:
    config = load_settings(MeshConfig, EXAMPLE)
    models = config.model_configs()
    assert [(m.model_id, m.pooling) for m in models] == [
        ("smol-chat", False), ("smol-short", False), (None, True)]
    chat, short = models[0].engine, models[1].engine
    assert (chat.max_model_len, short.max_model_len, short.max_num_seqs) == (4096, 1024, 8)
    assert [m.policy for m in models[:2]] == ["kv_aware", "round_robin"]


@pytest.mark.parametrize(("data", "expected"), [
    ({"models": [{"model_id": "a", "engnie": {}}]},
     "models.0.engnie: Extra inputs are not permitted"),
    ({"models": [{"model_id": "a"}, {"model_id": "b", "engine": {"max_model_len": -1}}]},
     "models.1.engine.max_model_len: Input should be greater than 0 (got -1)"),
    ({"models": [{"resources": {"num_cpus": -0.5}}]},
     "models.0.resources.num_cpus: Input should be greater than or equal to 0"),
    ({"models": [{"resources": {"resources": {"pool": -1}}}]},
     "models.0.resources.resources: resource 'pool' must be >= 0"),
    ({"models": [{"policy": "fastest"}]}, "models.0.policy: Input should be 'kv_aware'"),
    ({"models": [{"source": "ftp://x/y"}]}, "models.0.source: unknown scheme in 'ftp://x/y'"),
    ({"models": [{"engine": {"model": "/m"}}]},
     "models.0: engine.model is set by the model's `source` key"),
    ({"models": [{"workers": {"both": 0}}]}, "models.0.workers: a model needs at least one"),
    ({"models": [{"workers": {"prefill": 1}}]}, "prefill and decode workers come together"),
    ({"models": [{"engine": {"runner": "pooling"}, "workers": {"prefill": 1, "decode": 1}}]},
     "an embedding model (engine.runner: pooling) has no prefill/decode split"),
    ({"models": [{"model_id": "a"}], "workers": 2},
     "workers: single-model shorthand, not allowed with `models`"),
    ({"models": [{"model_id": "a"}], "worker": {"engine": {"model": "/m"}}},
     "worker.engine.model: single-model shorthand"),
    ({"models": [{"model_id": "a"}, {"model_id": "a"}]}, "model_id a is given more than once"),
    ({"models": [{"model_id": "has space"}]}, "models.0.model_id: String should match pattern"),
])
def test_faults_name_the_key(data: dict, expected: str) -> None:
    with pytest.raises(ValidationError) as exc:
        MeshConfig.model_validate(data)
    assert expected in faults(exc)


def test_every_fault_is_listed_on_its_own_line() -> None:
    with pytest.raises(ValidationError) as exc:
        MeshConfig.model_validate({"models": [{"engnie": {}, "workers": {"both": -1}}],
                                   "gateways": 0})
    text = describe(exc.value)
    assert text.startswith("invalid config (3 errors):")
    assert {"models.0.engnie", "models.0.workers.both", "gateways"} <= {
        line.strip().split(":")[0] for line in text.splitlines()[1:]}


def test_the_admin_service_names_the_key_of_a_bad_model() -> None:
    with pytest.raises(InvalidRequestError) as exc:
        parse_model('{"model_id": "x", "engine": {"block_size": "big"}}')
    assert exc.value.param == "engine.block_size"
    assert "engine.block_size: Input should be a valid integer" in exc.value.message
    assert parse_model({"model_id": "x", "policy": "random"}).policy == "random"


def test_build_app_validates_before_anything_starts() -> None:
    import kvmesh

    with pytest.raises(ValidationError, match="bogus"):
        kvmesh.build_app({"models": [{"model_id": "x", "bogus": 1}]})
    app = kvmesh.build_app({"models": [{"model_id": "x"}], "embeddings": {"workers": 0}})
    assert isinstance(app, kvmesh.MeshApp) and app.models() == []


def kvmesh_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmesh.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_kvmesh_up_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - model_id: a\n    engine: {max_model_len: 0, enforce_eagr: true}\n")
    out = kvmesh_cli("up", "--config", str(bad), "--state-file", str(tmp_path / "up.json"))
    assert out.returncode == 2
    assert "models.0.engine.max_model_len: Input should be greater than 0" in out.stderr
    assert "models.0.engine.enforce_eagr: Extra inputs are not permitted" in out.stderr
    assert "Traceback" not in out.stderr and "router" not in out.stdout + out.stderr
    assert not (tmp_path / "up.json").exists()


def test_kvmesh_models_add_refuses_a_bad_model_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "model.yaml"
    bad.write_text("model_id: c\nresources: {num_cpu: 0.5}\n")
    out = kvmesh_cli("models", "add", "--config", str(bad), "--state-file",
                     str(tmp_path / "none.json"))
    assert out.returncode == 2, out.stderr
    assert "resources.num_cpu: Extra inputs are not permitted" in out.stderr
