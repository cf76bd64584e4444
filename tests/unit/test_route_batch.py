"""RouteBatch: the router answers many routes (and applies finished reports) in one
call, each request with its own decision or error; the gateway's RouteBatcher sends
at once when idle and coalesces what arrives while a batch is out."""

import asyncio

import grpc
import pytest
from google.rpc import status_pb2

from kvmesh.core import route_batch
from kvmesh.core.config import RouterConfig
from kvmesh.core.route_batch import RouteBatcher
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import router_pb2

pytestmark = pytest.mark.unit


class NoDeadline:
    def time_remaining(self) -> None:
        return None


def _servicer() -> RouterServicer:
    core = RouterCore(RouterConfig(metrics_port=None, seed=0))
    servicer = RouterServicer(core, WorkerLifecycle(core))
    for wid in ("a", "b"):
        core.registry.upsert(WorkerState(worker_id=wid, endpoint=f"{wid}:1", model="m",
                                         block_size=32))
    return servicer


async def test_route_batch_answers_each_request_in_order_with_its_own_error() -> None:
    servicer = _servicer()
    first = await servicer.Route(router_pb2.RouteRequest(
        request_id="old", model="m", token_ids=list(range(64))), NoDeadline())
    held = servicer.core.registry.get(first.worker.worker_id)
    assert held.in_flight == {"old"}
    reply = await servicer.RouteBatch(router_pb2.RouteBatchRequest(
        requests=[router_pb2.RouteRequest(request_id="r1", model="m",
                                          token_ids=list(range(64))),
                  router_pb2.RouteRequest(request_id="r2", model="nope"),
                  router_pb2.RouteRequest(request_id="r3", model="m",
                                          token_ids=list(range(500, 600)))],
        finished=[router_pb2.RequestFinishedRequest(
            request_id="old", worker_id=first.worker.worker_id)]), NoDeadline())
    assert "old" not in held.in_flight  # finished reports applied
    ok1, bad, ok3 = reply.results
    assert ok1.code == 0 and ok1.decision.worker.worker_id in ("a", "b")
    assert ok1.decision.policy == "kv_aware"
    assert ok3.code == 0 and ok3.decision.worker.worker_id in ("a", "b")
    assert bad.code == grpc.StatusCode.NOT_FOUND.value[0] and not bad.HasField("decision")
    assert "nope" in bad.message and bad.param == "model"
    assert status_pb2.Status.FromString(bad.status_details).message == bad.message
    booked = {rid for w in servicer.core.registry.all() for rid in w.in_flight}
    assert booked == {"r1", "r3"}


class Router:
    """A RouteBatch endpoint that holds each call until released."""

    def __init__(self) -> None:
        self.calls: list[router_pb2.RouteBatchRequest] = []
        self.release = asyncio.Event()
        self.fail: grpc.aio.AioRpcError | None = None

    async def send(self, request: router_pb2.RouteBatchRequest,
                   timeout: float) -> router_pb2.RouteBatchResponse:
        self.calls.append(request)
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        results = []
        for r in request.requests:
            if r.model == "nope":
                results.append(router_pb2.RouteBatchResult(
                    code=grpc.StatusCode.NOT_FOUND.value[0], message="no such model",
                    param="model", status_details=status_pb2.Status(
                        code=5, message="no such model").SerializeToString()))
            else:
                results.append(router_pb2.RouteBatchResult(decision=router_pb2.RouteDecision(
                    reason=r.request_id)))
        return router_pb2.RouteBatchResponse(results=results)


async def test_batcher_sends_at_once_then_coalesces_while_a_batch_is_out() -> None:
    router = Router()
    batcher = RouteBatcher(router.send, timeout_s=5, max_in_flight=1)
    first = asyncio.create_task(batcher.route(router_pb2.RouteRequest(request_id="r0")))
    await asyncio.sleep(0.01)
    assert len(router.calls) == 1 and len(router.calls[0].requests) == 1  # not held back
    rest = [asyncio.create_task(batcher.route(router_pb2.RouteRequest(request_id=f"r{i}")))
            for i in range(1, 11)]
    for i in range(3):
        batcher.finished(f"f{i}", "a")
    await asyncio.sleep(0.01)
    assert len(router.calls) == 1  # waits for the batch that is out
    router.release.set()
    decisions = await asyncio.gather(first, *rest)
    assert [d.reason for d in decisions] == [f"r{i}" for i in range(11)]
    assert len(router.calls) == 2
    second = router.calls[1]
    assert [r.request_id for r in second.requests] == [f"r{i}" for i in range(1, 11)]
    assert [f.request_id for f in second.finished] == ["f0", "f1", "f2"]
    assert batcher.batches == 2 and batcher.routed == 11


async def test_batcher_raises_a_requests_error_as_its_route_call_would() -> None:
    router = Router()
    router.release.set()
    batcher = RouteBatcher(router.send, timeout_s=5)
    good, bad = await asyncio.gather(
        batcher.route(router_pb2.RouteRequest(request_id="ok", model="m")),
        batcher.route(router_pb2.RouteRequest(request_id="x", model="nope")),
        return_exceptions=True)
    assert isinstance(good, router_pb2.RouteDecision) and good.reason == "ok"
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() == grpc.StatusCode.NOT_FOUND and bad.details() == "no such model"
    trailers = dict(bad.trailing_metadata())
    assert trailers["kvmesh-error-param"] == "model"
    assert status_pb2.Status.FromString(trailers["grpc-status-details-bin"]).code == 5


async def test_a_failed_batch_fails_every_route_in_it() -> None:
    router = Router()
    router.fail = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "router down")
    router.release.set()
    batcher = RouteBatcher(router.send, timeout_s=5)
    results = await asyncio.gather(
        *(batcher.route(router_pb2.RouteRequest(request_id=str(i))) for i in range(3)),
        return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError)
               and r.code() == grpc.StatusCode.UNAVAILABLE for r in results)


async def test_finished_reports_go_at_once_when_idle_and_ride_along_under_load() -> None:
    router = Router()
    batcher = RouteBatcher(router.send, timeout_s=5, max_in_flight=1)
    # Nothing out: the report goes at once (another gateway's next request is routed on
    # the router's view of that worker).
    batcher.finished("f0", "a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(router.calls) == 1 and [f.request_id for f in router.calls[0].finished] == [
        "f0"]
    # A batch out: reports wait and ride with the next batch.
    batcher.finished("f1", "a")
    pending = asyncio.create_task(batcher.route(router_pb2.RouteRequest(request_id="r0")))
    await asyncio.sleep(0)
    assert len(router.calls) == 1  # the first call still out
    router.release.set()
    await pending
    assert [f.request_id for f in router.calls[1].finished] == ["f1"]
    assert [r.request_id for r in router.calls[1].requests] == ["r0"]  # rode along
    # Under load, with nothing to ride with: alone after FINISH_DELAY_S.
    router.release.clear()
    busy = asyncio.create_task(batcher.route(router_pb2.RouteRequest(request_id="r1")))
    await asyncio.sleep(0)
    batcher.finished("f2", "a")
    router.release.set()
    await busy
    await asyncio.sleep(route_batch.FINISH_DELAY_S * 3)
    assert [f.request_id for f in router.calls[-1].finished] == ["f2"]


async def test_close_sends_the_finished_reports_still_waiting() -> None:
    router = Router()
    batcher = RouteBatcher(router.send, timeout_s=5, max_in_flight=1)
    held = asyncio.create_task(batcher.route(router_pb2.RouteRequest(request_id="r")))
    for _ in range(3):
        await asyncio.sleep(0)
    batcher.finished("done", "a")  # a batch is out: the report waits for the next
    assert len(router.calls) == 1 and not router.calls[0].finished
    router.release.set()
    await held
    await batcher.close()
    assert [f.request_id for c in router.calls for f in c.finished] == ["done"]
    assert not batcher._tasks


async def test_finished_reports_of_a_failed_batch_are_sent_again(monkeypatch) -> None:
    """A batch that fails on the way (the stream broke, the replica blinked) must not
    lose its finished reports: the router would count those requests in flight for
    good. They go out again after FINISH_RETRY_DELAY_S, until FINISH_RETRY_S."""
    monkeypatch.setattr(route_batch, "FINISH_RETRY_DELAY_S", 0.05)
    router = Router()
    router.release.set()
    router.fail = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "blink")
    batcher = RouteBatcher(router.send, timeout_s=5)
    batcher.finished("r1", "a")
    await asyncio.sleep(0.01)
    assert [f.request_id for f in router.calls[0].finished] == ["r1"]
    router.fail = None
    await asyncio.sleep(0.2)
    assert [f.request_id for c in router.calls[1:] for f in c.finished] == ["r1"]
    assert len(router.calls) == 2  # delivered once: not sent again after that
    # A router that stays unreachable: given up after FINISH_RETRY_S, not retried forever.
    monkeypatch.setattr(route_batch, "FINISH_RETRY_S", 0.3)
    router.fail = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "gone")
    batcher.finished("r2", "b")
    await asyncio.sleep(0.6)
    tries = len(router.calls) - 2
    assert 3 <= tries <= 8, tries
    await asyncio.sleep(0.3)
    assert len(router.calls) - 2 == tries
    await batcher.close()
