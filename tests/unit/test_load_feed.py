"""The router's load feed: the records a worker pushes on its event stream are not
overwritten by the GetLoads poll (which lacks the prefill in hand and is read at
another moment); the poll feeds the load only while no record is pushed."""

import pytest
from smg_grpc_proto.generated import common_pb2 as smg_common_pb2

from kvmesh.core.config import RouterConfig
from kvmesh.router import worker_probe
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState

pytestmark = pytest.mark.unit


def lifecycle() -> WorkerLifecycle:
    core = RouterCore(RouterConfig(policy="kv_aware", metrics_port=None, seed=0,
                                   probe_interval_s=0.05))
    core.registry.upsert(WorkerState(worker_id="w", endpoint="127.0.0.1:1", model="m",
                                     block_size=32))
    return WorkerLifecycle(core)


async def test_a_pushed_load_is_not_overwritten_by_the_poll(monkeypatch) -> None:
    life = lifecycle()

    async def polled(channel, timeout_s=1.0):
        # What GetLoads says: the queue, without the prefill already running.
        return worker_probe.LoadSample(num_running=1, num_waiting=0, kv_usage=0.1,
                                       kv_capacity_tokens=0, waiting_uncached_tokens=0)

    monkeypatch.setattr(worker_probe, "sample_load", polled)
    life.pushed_load("w", smg_common_pb2.EngineLoad(
        running_requests=1, waiting_requests=2, token_usage=0.2,
        waiting_uncached_tokens=900, prefill_pending_tokens=2400))
    assert await life.probe("w", "127.0.0.1:1")  # answered: alive
    load = life.core.registry.get("w").load
    assert (load.num_waiting, load.waiting_uncached_tokens) == (2, 2400)
    # The stream fell silent for two intervals: the poll feeds the load again.
    life._pushed_at["w"] -= 1.0
    assert await life.probe("w", "127.0.0.1:1")
    assert life.core.registry.get("w").load.waiting_uncached_tokens == 0
