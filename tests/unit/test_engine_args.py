from pathlib import Path

import pytest

from kvmesh.core.config import EngineConfig, WorkerConfig
from kvmesh.worker.engine_args import (
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
        engine=EngineConfig(block_size=32, enforce_eager=True, max_num_seqs=8, num_kv_blocks=96),
        run_dir="/r"
    )
    kw = engine_kwargs(config, Path("/m"), "smol", "w1")
    assert kw["model"] == "/m"
    assert kw["served_model_name"] == ["smol"]
    assert kw["block_size"] == 32 and kw["enforce_eager"] is True and kw["max_num_seqs"] == 8
    assert kw["num_gpu_blocks_override"] == 96
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


def test_roles_map_to_kv_transfer_config() -> None:
    from kvmesh.core.config import KvTransferConfig
    from kvmesh.worker.engine_args import kv_transfer_config, nixl_side_channel

    assert kv_transfer_config(WorkerConfig()) is None
    assert "kv_transfer_config" not in engine_kwargs(WorkerConfig(), Path("/m"), "s", "w")
    kv = KvTransferConfig(side_channel_port=5601, kv_lease_s=12)
    prefill = WorkerConfig(role="prefill", kv_transfer=kv)
    cfg = kv_transfer_config(prefill)
    assert cfg == {
        "kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kv_lease_duration": 12},
    }
    assert engine_kwargs(prefill, Path("/m"), "s", "w")["kv_transfer_config"] == cfg
    decode = WorkerConfig(role="decode", kv_transfer=kv)
    assert kv_transfer_config(decode)["kv_role"] == "kv_consumer"  # type: ignore[index]
    assert nixl_side_channel(decode) == "127.0.0.1:5601"
    env = engine_env(decode)
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in engine_env(WorkerConfig())
    with pytest.raises(ValueError, match="resolved"):
        nixl_side_channel(WorkerConfig(role="prefill"))


def test_lmcache_connector_config() -> None:
    from kvmesh.core.config import KvTransferConfig
    from kvmesh.worker.engine_args import kv_transfer_config, nixl_side_channel

    kv = KvTransferConfig(connector="lmcache", buffer_device="cuda",
                          lmcache_config_file="/etc/lmcache.yaml")
    prefill = WorkerConfig(role="prefill", kv_transfer=kv)
    assert kv_transfer_config(prefill) == {
        "kv_connector": "LMCacheConnectorV1", "kv_role": "kv_producer",
        "kv_buffer_device": "cuda", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"discard_partial_chunks": False,
                                      "lmcache_rpc_port": "kv_producer-rpc"},
    }
    assert nixl_side_channel(prefill) == ""
    env = engine_env(prefill)
    assert env["LMCACHE_CONFIG_FILE"] == "/etc/lmcache.yaml"
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env


def test_engine_nice_is_off_by_default_and_bounded() -> None:
    assert WorkerConfig().engine_nice == 0
    assert WorkerConfig(engine_nice=19).engine_nice == 19
    with pytest.raises(ValueError, match="less than or equal to 19"):
        WorkerConfig(engine_nice=20)


def test_a_nixl_worker_gets_a_free_side_channel_and_refuses_a_taken_one() -> None:
    """vLLM's NIXL listener thread dies on a taken port and its engine never finishes
    starting: a worker is given a free port, and one it was told to use must be free."""
    import socket

    from kvmesh.core.errors import InvalidRequestError
    from kvmesh.worker.worker import with_side_channel

    given = with_side_channel(WorkerConfig(role="prefill"))
    assert given.kv_transfer.side_channel_port > 0
    assert with_side_channel(WorkerConfig(role="both")).kv_transfer.side_channel_port == 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(InvalidRequestError, match=f"side_channel_port {taken} is in use"):
            with_side_channel(WorkerConfig(role="decode",
                                           kv_transfer={"side_channel_port": taken}))
