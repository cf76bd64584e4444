"""What the router learns from a worker over its VllmEngine contract (through the
worker's stub, kept by the caller: building one registers every method of the contract
with its channel, which a probe a second would pay each time)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerFacts:
    model: str
    block_size: int
    max_context_length: int
    kv_capacity_tokens: int
    # When the worker's server started (wall clock): a restart changes it.
    incarnation: float = 0.0


@dataclass(frozen=True)
class LoadSample:
    num_running: int
    num_waiting: int
    kv_usage: float
    kv_capacity_tokens: int
    waiting_uncached_tokens: int = 0
    cache_hit_rate: float = 0.0


async def describe(stub: vllm_engine_pb2_grpc.VllmEngineStub,
                   timeout_s: float = PROBE_TIMEOUT_S) -> WorkerFacts:
    """Model name, block size, context length and KV capacity of a worker."""
    info = await stub.GetModelInfo(vllm_engine_pb2.GetModelInfoRequest(), timeout=timeout_s)
    server = await stub.GetServerInfo(vllm_engine_pb2.GetServerInfoRequest(), timeout=timeout_s)
    load = await sample_load(stub, timeout_s)
    return WorkerFacts(
        model=info.served_model_name or info.model_path,
        block_size=server.block_size,
        max_context_length=info.max_context_length,
        kv_capacity_tokens=load.kv_capacity_tokens,
        incarnation=_started_at(server),
    )


def _started_at(server: vllm_engine_pb2.GetServerInfoResponse) -> float:
    return time.time() - server.uptime_seconds if server.uptime_seconds else 0.0


async def incarnation(stub: vllm_engine_pb2_grpc.VllmEngineStub,
                      timeout_s: float = PROBE_TIMEOUT_S) -> float:
    """When the worker's server started (0: it does not say): a restart changes it."""
    server = await stub.GetServerInfo(vllm_engine_pb2.GetServerInfoRequest(), timeout=timeout_s)
    return _started_at(server)


async def sample_load(stub: vllm_engine_pb2_grpc.VllmEngineStub,
                      timeout_s: float = PROBE_TIMEOUT_S) -> LoadSample:
    """Sum the worker's per-DP-rank loads into one sample."""
    reply = await stub.GetLoads(vllm_engine_pb2.GetLoadsRequest(), timeout=timeout_s)
    loads = list(reply.loads)
    if not loads:
        return LoadSample(0, 0, 0.0, 0)
    return LoadSample(
        num_running=sum(x.num_running_reqs for x in loads),
        num_waiting=sum(x.num_waiting_reqs for x in loads),
        kv_usage=max(x.token_usage for x in loads),
        kv_capacity_tokens=sum(x.max_total_num_tokens for x in loads),
        waiting_uncached_tokens=sum(x.num_waiting_uncached_tokens for x in loads),
        cache_hit_rate=sum(x.cache_hit_rate for x in loads) / len(loads),
    )
