"""The gateway's router replicas and its own routing while none answers (pure parts)."""

from __future__ import annotations

import random

import grpc
import pytest

from kvmesh.core.errors import ModelNotFoundError, NoWorkerAvailableError
from kvmesh.core.grpc_util import GRPC_DETAILS_METADATA_KEY
from kvmesh.gateway.local_route import REASON, LocalRouter
from kvmesh.gateway.router_client import ReplicaSet, replica_failed
from kvmesh.router.registry import WorkerRegistry, WorkerState
from kvmesh.v1 import common_pb2

pytestmark = pytest.mark.unit


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failed_replica_rests_then_comes_back_first() -> None:
    clock = Clock()
    replicas = ReplicaSet(["a", "b"], retry_s=1.0, clock=clock)
    assert replicas.available() == ["a", "b"]
    replicas.failed("a")
    assert replicas.available() == ["b"]
    replicas.failed("b")
    assert replicas.available() == []  # the gateway routes on its own now
    clock.now = 1.0
    assert replicas.available() == ["a", "b"]  # preference order again
    with pytest.raises(ValueError):
        ReplicaSet([], 1.0)


def _error(code: grpc.StatusCode, details: bool) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*([(GRPC_DETAILS_METADATA_KEY, b"x")] if details else []))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "d")


def test_transport_failures_are_not_answers() -> None:
    assert replica_failed(_error(grpc.StatusCode.UNAVAILABLE, details=False))
    assert replica_failed(_error(grpc.StatusCode.DEADLINE_EXCEEDED, details=False))
    # The router answered (a kvmesh error with details): no failover.
    assert not replica_failed(_error(grpc.StatusCode.UNAVAILABLE, details=True))
    assert not replica_failed(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, details=False))
    assert not replica_failed(_error(grpc.StatusCode.NOT_FOUND, details=False))


def worker(wid: str, model: str = "m", role: int = common_pb2.WORKER_ROLE_BOTH
           ) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(worker_id=wid, endpoint=f"{wid}:1", model=model, role=role)


def test_local_power_of_two_prefers_the_less_busy() -> None:
    local = LocalRouter(random.Random(0))
    workers = [worker("a"), worker("b")]
    for _ in range(3):
        local.started("a")
    picks = {local.pick(workers, "m").worker.worker_id for _ in range(20)}
    assert picks == {"b"}
    decision = local.pick(workers, "m")
    assert decision.reason == REASON
    for _ in range(3):
        local.finished("a")
    assert local.in_flight == {}


def test_local_routing_skips_excluded_prefill_and_other_models() -> None:
    local = LocalRouter(random.Random(1))
    workers = [worker("p", role=common_pb2.WORKER_ROLE_PREFILL),
               worker("d", role=common_pb2.WORKER_ROLE_DECODE), worker("x", model="other"),
               worker("a")]
    assert {local.pick(workers, "m", ["a"]).worker.worker_id for _ in range(10)} == {"d"}
    with pytest.raises(NoWorkerAvailableError):
        local.pick(workers, "m", ["a", "d"])
    with pytest.raises(ModelNotFoundError):
        local.pick(workers, "nope")


def test_unreachable_worker_leaves_and_rejoins_the_routing_set() -> None:
    registry = WorkerRegistry(lease_ttl_s=10)
    registry.upsert(WorkerState("a", "a:1", "m"))
    registry.upsert(WorkerState("b", "b:1", "m"))
    version = registry.version
    assert registry.set_reachable("a", False)
    assert [w.worker_id for w in registry.candidates("m")] == ["b"]
    assert registry.version == version + 1
    assert not registry.set_reachable("a", False)  # no change, no new version
    assert registry.set_reachable("a", True)
    assert [w.worker_id for w in registry.candidates("m")] == ["a", "b"]
    assert not registry.set_reachable("a", True) and not registry.set_reachable("zz", False)


def test_only_ejected_workers_left_are_routed_to_anyway() -> None:
    """Envoy's panic mode: when ejection would leave no worker, route to the ejected."""
    import asyncio

    from kvmesh.core.resilience_config import OutlierConfig
    from kvmesh.gateway.mesh import MeshClient
    from kvmesh.gateway.router_client import RouterClient

    workers = [worker("a"), worker("b")]

    async def run() -> set[str]:
        routers = RouterClient(["127.0.0.1:1"], 1, 60, lambda: (workers, set()))
        routers.replicas.failed("127.0.0.1:1")  # no router: the gateway routes on its own
        mesh = MeshClient(routers, 5, outlier=OutlierConfig(consecutive_failures=1,
                                                            max_ejection_percent=100))
        mesh.outliers.failure("a", 2)
        mesh.outliers.failure("b", 2)
        assert mesh.outliers.ejected() == ["a", "b"]
        chosen = {(await mesh.route("r", "m", [1], 4)).decision.worker.worker_id
                  for _ in range(64)}  # random picks: 10 missed one 1 time in 512
        with pytest.raises(NoWorkerAvailableError):  # excluded by the caller: no panic
            await mesh.route("r", "m", [1], 4, ["a", "b"])
        await routers.close()
        return chosen

    assert asyncio.run(run()) == {"a", "b"}
