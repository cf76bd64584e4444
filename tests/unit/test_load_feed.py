"""The router's load feed: the records a worker pushes on its event stream are not
overwritten by the GetLoads poll (which lacks the prefill in hand and is read at
another moment); the poll feeds the load only while no record is pushed."""

import asyncio
import random
from types import SimpleNamespace

import pytest
from smg_grpc_proto.generated import common_pb2 as smg_common_pb2

from kvmesh.core.config import RouterConfig
from kvmesh.router import lifecycle as lifecycle_module
from kvmesh.router import worker_probe
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle, probe_pauses
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


async def test_workers_registered_together_are_not_polled_together(monkeypatch) -> None:
    """256 probe loops started in the same instant (a fleet registering at once, or
    restored after a router restart) poll at their own phases: no burst of 256 calls
    once per interval that routing decisions queue behind."""
    life = lifecycle()
    interval = life._config.probe_interval_s
    loop = asyncio.get_running_loop()
    polled: list[float] = []

    async def probe(worker_id: str, endpoint: str) -> bool:
        polled.append(loop.time())
        return True

    monkeypatch.setattr(life, "probe", probe)
    start = loop.time()
    tasks = [asyncio.create_task(life._probe_loop(f"w{i}", "127.0.0.1:1"))
             for i in range(256)]
    await asyncio.sleep(3.5 * interval)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    later = sorted(t - start for t in polled if t - start > interval * 1.2)
    # About one interval's worth of polls per interval (the mean pause is the
    # interval), and in any tenth of an interval at most a fifth of the fleet.
    assert 256 * 1.5 < len(later) < 256 * 2.6
    tenth = interval / 10
    busiest = max(sum(1 for t in later if s <= t < s + tenth) for s in later)
    assert busiest <= 256 // 5, busiest


def test_probe_pauses_keep_the_interval_on_average() -> None:
    pauses = probe_pauses(2.0, random.Random(1))
    assert 0.0 <= next(pauses) <= 2.0  # the phase
    rest = [next(pauses) for _ in range(2000)]
    assert all(1.8 <= p <= 2.2 for p in rest)
    assert abs(sum(rest) / len(rest) - 2.0) < 0.02


async def test_a_worker_whose_stream_pushes_its_load_is_not_polled(monkeypatch) -> None:
    """The event stream's load records prove the worker alive and are fresher than a
    poll: while they arrive the GetLoads poll (a unary call on the router's one event
    loop) is skipped; once they stop, or the stream closes, polling resumes within an
    interval. A worker out of the routing set is always polled (its way back in)."""
    life = lifecycle()
    interval = life._config.probe_interval_s
    polled: list[str] = []

    async def probe(worker_id: str, endpoint: str) -> bool:
        polled.append(worker_id)
        return True

    monkeypatch.setattr(life, "probe", probe)
    monkeypatch.setattr(lifecycle_module, "PUSH_FRESH_S", 2 * interval)
    follower = SimpleNamespace(streaming=True)
    life.followers["w"] = follower  # type: ignore[assignment]
    load = smg_common_pb2.EngineLoad(running_requests=1, load_only=True)

    async def pushing(seconds: float) -> None:
        for _ in range(round(seconds / (interval / 4))):
            life.pushed_load("w", load)
            await asyncio.sleep(interval / 4)

    loop_task = asyncio.create_task(life._probe_loop("w", "127.0.0.1:1"))
    try:
        await asyncio.sleep(1.5 * interval)  # the first poll, before any push
        first = len(polled)
        await pushing(6 * interval)
        assert len(polled) == first
        await asyncio.sleep(3 * interval)  # pushes stopped: polled again
        assert len(polled) > first
        seen = len(polled)
        follower.streaming = False  # the stream closed though a push is fresh
        life.pushed_load("w", load)
        await asyncio.sleep(2.5 * interval)
        assert len(polled) > seen
        follower.streaming = True
        life.core.set_reachable("w", False)
        seen = len(polled)
        await pushing(3 * interval)
        assert len(polled) > seen
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)


async def test_a_broken_stream_gets_the_worker_probed_at_once(monkeypatch) -> None:
    life = lifecycle()
    probed: list[str] = []

    async def probe(worker_id: str, endpoint: str) -> bool:
        probed.append(worker_id)
        return False

    monkeypatch.setattr(life, "probe", probe)
    life._probe_now("w")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert probed == ["w"]
