import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from kvmesh.core.config import (
    GatewayConfig,
    RouterConfig,
    WorkerConfig,
    dump_settings,
    load_settings,
)
from kvmesh.core.mesh_config import MeshConfig

pytestmark = pytest.mark.unit


def test_precedence_flags_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("policy: round_robin\nport: 7000\nlease_ttl_s: 30\n")
    assert load_settings(RouterConfig, f).port == 7000
    monkeypatch.setenv("KVMESH_ROUTER_PORT", "7100")
    cfg = load_settings(RouterConfig, f)
    assert (cfg.port, cfg.policy, cfg.lease_ttl_s) == (7100, "round_robin", 30)
    assert load_settings(RouterConfig, f, port=7200, policy=None).port == 7200


def test_mesh_file_sections_merge_with_flags(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("router: {lease_ttl_s: 20}\nworker: {engine: {max_model_len: 2048}}\n")
    cfg = load_settings(
        MeshConfig, f, router={"policy": "random"}, worker={"engine": {"enforce_eager": True}}
    )
    assert cfg.router.policy == "random" and cfg.router.lease_ttl_s == 20
    assert cfg.worker.engine.max_model_len == 2048 and cfg.worker.engine.enforce_eager
    assert "port" not in cfg.router.model_fields_set


def test_validation_errors() -> None:
    with pytest.raises(ValidationError):
        RouterConfig(policy="nope")
    with pytest.raises(ValidationError, match="lease_ttl_s"):
        RouterConfig(heartbeat_interval_s=5, lease_ttl_s=5)
    with pytest.raises(ValidationError):
        GatewayConfig(bogus=1)
    with pytest.raises(ValidationError):
        MeshConfig(workers=0)


def test_dump_roundtrip(tmp_path: Path) -> None:
    cfg = WorkerConfig(router="127.0.0.1:1", cpu_bind="1")
    path = dump_settings(cfg, tmp_path / "w.json")
    assert json.loads(path.read_text())["cpu_bind"] == "1"
    assert load_settings(WorkerConfig, path) == cfg


def _models(cls: type[BaseModel]) -> list[type[BaseModel]]:
    out = [cls]
    for field in cls.model_fields.values():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _models(ann)
    return out


@pytest.mark.parametrize("cls", [MeshConfig, RouterConfig, GatewayConfig, WorkerConfig])
def test_every_field_is_described(cls: type[BaseModel]) -> None:
    for model in _models(cls):
        missing = [n for n, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__}: {missing}"


def test_pd_mesh_roles_and_per_role_engines(tmp_path: Path) -> None:
    from kvmesh.launch.pools import plan_pools

    f = tmp_path / "pd.yaml"
    f.write_text(
        "workers: 1\nprefill: 2\ndecode: 1\n"
        "worker:\n  engine:\n    block_size: 32\n    max_num_seqs: 16\n"
        "prefill_engine:\n  max_num_seqs: 2\n"
        "decode_engine:\n  max_model_len: 2048\n"
    )
    config = load_settings(MeshConfig, f)
    (pool,) = plan_pools(config.model_copy(update={"embeddings": config.embeddings.model_copy(
        update={"workers": 0})}), "127.0.0.1:1", tmp_path)
    configs = pool.workers
    assert [c.role.value for c in configs] == ["both", "prefill", "prefill", "decode"]
    both, p1, _, d = configs
    assert (both.engine.max_num_seqs, both.engine.block_size) == (16, 32)
    # Per-role settings override only what they name; the rest comes from worker.engine.
    assert (p1.engine.max_num_seqs, p1.engine.block_size) == (2, 32)
    assert (d.engine.max_num_seqs, d.engine.max_model_len, d.engine.block_size) == (16, 2048, 32)
    assert both.engine.max_model_len == 4096


def test_pd_mesh_needs_both_pools() -> None:
    with pytest.raises(ValidationError, match="both or neither"):
        MeshConfig(workers=0, prefill=1)
    with pytest.raises(ValidationError, match="at least one worker"):
        MeshConfig(workers=0)
    assert len(MeshConfig(workers=0, prefill=1, decode=1).worker_roles()) == 2


def test_router_config_reaches_the_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost model's parameters are the router's config (file, env or flags), not
    defaults built inside the router."""
    from kvmesh.router.core import RouterCore
    from kvmesh.router.policy.kv_aware import KvAwarePolicy

    monkeypatch.setenv("KVMESH_ROUTER_COST__BACKLOG_WEIGHT", "0.5")
    config = RouterConfig(cost={"prefill_tokens_per_s": 9000.0}, metrics_port=None)
    core = RouterCore(config)
    assert core.cost_params.prefill_tokens_per_s == 9000.0
    assert isinstance(core.policy, KvAwarePolicy)
    assert core.policy.params is core.cost_params
    assert RouterCore(RouterConfig(metrics_port=None)).cost_params.backlog_weight == 0.5
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
        RouterConfig(cost={"prefill_tokens_per_s": 0})
