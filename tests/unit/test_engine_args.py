from pathlib import Path

import pytest

from kvmesh.config import EngineConfig, WorkerConfig
from kvmesh.services.engine_args import (
    cpu_binding,
    engine_env,
    engine_kwargs,
    kv_events_config,
    parse_cores,
)

pytestmark = pytest.mark.unit


def test_kv_events_use_ipc_never_tcp() -> None:
    cfg = kv_events_config(Path("/run/x"), "127.0.0.1:5000")
    assert cfg["endpoint"] == "ipc:///run/x/127.0.0.1_5000-kv"
    assert cfg["replay_endpoint"] == "ipc:///run/x/127.0.0.1_5000-kvr"
    assert cfg["enable_kv_cache_events"] is True


def test_engine_kwargs_map_config() -> None:
    config = WorkerConfig(
        engine=EngineConfig(block_size=32, enforce_eager=True, max_num_seqs=8), run_dir="/r"
    )
    kw = engine_kwargs(config, Path("/m"), "smol", "w1")
    assert kw["model"] == "/m"
    assert kw["served_model_name"] == ["smol"]
    assert kw["block_size"] == 32 and kw["enforce_eager"] is True and kw["max_num_seqs"] == 8
    assert kw["disable_log_stats"] is False
    assert kw["kv_events_config"]["endpoint"].startswith("ipc:///r/")
    assert "block_size" not in engine_kwargs(WorkerConfig(), Path("/m"), "s", "w")


def test_engine_env_binds_cores() -> None:
    env = engine_env(WorkerConfig(cpu_bind="0-1", engine=EngineConfig(kv_cache_space_gib=2)))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(
    ("index", "count", "ncpus", "expected"),
    [(0, 1, 2, "0-1"), (0, 2, 2, "0"), (1, 2, 2, "1"), (1, 2, 8, "4-7"), (3, 4, 2, "1")],
)
def test_cpu_binding(index: int, count: int, ncpus: int, expected: str) -> None:
    assert cpu_binding(index, count, ncpus) == expected


def test_parse_cores() -> None:
    assert parse_cores("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        parse_cores(" , ")
