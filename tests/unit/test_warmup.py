"""A restarted router waits for its snapshot's workers before it routes (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.router import snapshot
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.warmup import Warmup

pytestmark = pytest.mark.unit


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_warm_once_every_snapshotted_worker_is_back() -> None:
    warmup = Warmup(max_s=5, clock=Clock())
    assert warmup.missing([]) == []  # no snapshot: warm at once
    warmup.expect(["a", "b"])
    assert warmup.missing([]) == ["a", "b"]
    assert warmup.missing(["a"]) == ["b"]
    assert warmup.missing(["a", "b", "c"]) == []
    assert warmup.missing([]) == []  # warm stays warm


def test_warm_after_max_s_even_if_a_worker_never_returns() -> None:
    clock = Clock()
    warmup = Warmup(max_s=5, clock=clock)
    warmup.expect(["a", "dead"])
    assert warmup.missing(["a"]) == ["dead"]
    clock.now = 5.0
    assert warmup.missing(["a"]) == []


def test_snapshot_lists_workers_with_nothing_cached(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    snapshot.write(path, snapshot.capture({"idle": snapshot.empty_view()}, {"idle": 12.0}))
    restored = snapshot.read(path, 60)
    assert list(restored) == ["idle"] and restored["idle"].incarnation == 12.0
    assert snapshot.restore(PrefixIndex(), "idle", restored["idle"]) == 0


async def test_a_young_router_with_no_worker_refuses_route_as_unavailable() -> None:
    # Restarted without a snapshot that lists its workers: until one registers again,
    # "model not found" would be a lie (a 404 at the gateway) — unavailable instead, so
    # the gateway asks another replica or routes on its own.
    import grpc

    from kvmesh.core.config import RouterConfig
    from kvmesh.router.core import RouterCore
    from kvmesh.router.lifecycle import WorkerLifecycle
    from kvmesh.router.registry import WorkerState
    from kvmesh.router.servicer import RouterServicer
    from kvmesh.v1 import router_pb2

    class Aborted(Exception):
        pass

    class Context:
        code: grpc.StatusCode | None = None

        def time_remaining(self) -> None:
            return None

        async def abort(self, code: grpc.StatusCode, message: str) -> None:
            self.code = code
            raise Aborted(message)

    core = RouterCore(RouterConfig(policy="kv_aware", metrics_port=None, seed=0))
    servicer = RouterServicer(core, WorkerLifecycle(core))
    request = router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1, 2, 3])
    context = Context()
    with pytest.raises(Aborted, match="just started"):
        await servicer.Route(request, context)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    core.registry.upsert(WorkerState(worker_id="a", endpoint="a:1", model="m",
                                     block_size=32))
    assert (await servicer.Route(request, context)).worker.worker_id == "a"


def test_young_only_for_its_first_max_s() -> None:
    clock = Clock()
    warmup = Warmup(max_s=5, clock=clock)
    assert warmup.young()
    clock.now = 5.0
    assert not warmup.young()
