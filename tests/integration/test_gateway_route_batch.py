"""The gateway's RouterClient sends routes and finished reports in RouteBatch calls,
against real router servicers on real gRPC servers (in this process): concurrent
requests share calls, and everything a Route call did still holds — errors as the same
AioRpcError, failover to the next replica, previews, the preferred worker, adapters,
finished and lost-worker reports, a request waiting for a worker slot (admission)
holding no other request back, and one Route call per request with tracing on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

import kvmesh.core.tracing as tracing
from kvmesh.core import route_batch
from kvmesh.core.config import RouterConfig
from kvmesh.core.grpc_util import GRPC_DETAILS_METADATA_KEY, bind, create_server
from kvmesh.core.net import free_port
from kvmesh.gateway.router_client import RouterClient, preferred_worker, replica_failed
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import common_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration
PROMPT = list(range(256))


@dataclass
class Replica:
    address: str
    servicer: RouterServicer
    server: grpc.aio.Server
    suspected: list[str]
    route_calls: int = 0
    unary_batch_calls: int = 0

    @property
    def core(self) -> RouterCore:
        return self.servicer.core


class CountingServicer(RouterServicer):
    """The router's servicer, counting Route calls (RouteBatch calls count themselves:
    ``kvmesh_router_route_batch_size``)."""

    replica: Replica

    async def Route(self, request, context):  # type: ignore[no-untyped-def]
        self.replica.route_calls += 1
        return await super().Route(request, context)

    async def RouteBatch(self, request, context):  # type: ignore[no-untyped-def]
        self.replica.unary_batch_calls += 1
        return await super().RouteBatch(request, context)


class OldServicer(CountingServicer):
    """A router from before RouteStream: the generated base's UNIMPLEMENTED."""

    RouteStream = router_pb2_grpc.RouterServicer.RouteStream  # type: ignore[assignment]


async def start_replica(config: RouterConfig | None = None, port: int = 0,
                        servicer_class: type[CountingServicer] = CountingServicer
                        ) -> Replica:
    core = RouterCore(config or RouterConfig(metrics_port=None, seed=0))
    for wid, model, adapters in (("a", "m", ()), ("b", "m", ("sql",)), ("c", "m2", ())):
        core.registry.upsert(WorkerState(worker_id=wid, endpoint=f"{wid}:1", model=model,
                                         block_size=32, servable_adapters=adapters))
    lifecycle = WorkerLifecycle(core)
    suspected: list[str] = []

    async def suspect(worker_id: str) -> None:  # the probe it would start
        suspected.append(worker_id)

    lifecycle.suspect = suspect  # type: ignore[method-assign]
    servicer = servicer_class(core, lifecycle)
    server = create_server()
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", port)
    await server.start()
    replica = Replica(f"127.0.0.1:{port}", servicer, server, suspected)
    servicer.replica = replica
    return replica


def batches(replica: Replica) -> tuple[float, float]:
    """(RouteBatch calls, routes they carried) the replica answered."""
    histogram = replica.core.metrics.route_batch_size
    count = sum(s.value for m in histogram.collect() for s in m.samples
                if s.name.endswith("_count"))
    total = sum(s.value for m in histogram.collect() for s in m.samples
                if s.name.endswith("_sum"))
    return count, total


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started = [await start_replica(), await start_replica()]
    yield started
    for r in started:
        await r.server.stop(None)


def client(addresses: list[str]) -> RouterClient:
    return RouterClient(addresses, route_timeout_s=5, retry_s=60,
                        workers=lambda: ([], set()))


def booked(replica: Replica) -> set[str]:
    return {rid for w in replica.core.registry.all() for rid in w.in_flight}


async def test_concurrent_routes_share_routebatch_calls(replicas: list[Replica]) -> None:
    r0, _ = replicas
    routers = client([r0.address])
    n = 40
    routed = await asyncio.gather(*(routers.route(f"q{i}", "m", PROMPT, 8)
                                    for i in range(n)))
    calls, carried = batches(r0)
    print(f"\n{n} concurrent routes: {calls:.0f} batches, {r0.route_calls} Route")
    assert carried == n and r0.route_calls == 0  # every route rode in a batch
    assert calls < n / 2  # ...and they shared batches
    # ...on one RouteStream: no unary call each
    assert r0.unary_batch_calls == 0 and routers.streams[0].opened == 1
    assert all(r.router == r0.address for r in routed)
    assert {r.decision.worker.worker_id for r in routed} <= {"a", "b"}
    assert booked(r0) == {f"q{i}" for i in range(n)}
    # Finished reports ride along (or go after FINISH_DELAY_S on their own).
    for r, i in zip(routed, range(n), strict=True):
        await routers.finished(f"q{i}", r.decision.worker.worker_id, r.router)
    await asyncio.sleep(route_batch.FINISH_DELAY_S + 0.2)
    assert booked(r0) == set()
    assert batches(r0)[1] == n  # the reports took no routes with them
    await routers.close()


async def test_errors_preview_preferred_worker_and_adapters(replicas: list[Replica]) -> None:
    r0, _ = replicas
    routers = client([r0.address])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await routers.route("bad", "no-such-model", PROMPT, 8)
    # The router's answer, as a Route call raises it: its code, message and details.
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (err.value.details() or "")
    assert any(k == GRPC_DETAILS_METADATA_KEY for k, _ in err.value.trailing_metadata())
    assert not replica_failed(err.value)
    assert routers.replicas.available() == [r0.address]  # an answer: no failover
    preview = await routers.route("p", "m", PROMPT, 8, preview=True)
    assert preview.decision.worker.worker_id in {"a", "b"} and booked(r0) == set()
    token = preferred_worker.set("b")
    try:
        pinned = await routers.route("pin", "m", PROMPT, 8)
    finally:
        preferred_worker.reset(token)
    assert pinned.decision.worker.worker_id == "b"
    lora = await routers.route("lora", "m", PROMPT, 8, adapter="sql")
    assert lora.decision.worker.worker_id == "b"  # the one that can serve the adapter
    excluded = await routers.route("x", "m", PROMPT, 8, exclude=["a"])
    assert excluded.decision.worker.worker_id == "b"
    assert r0.route_calls == 0 and batches(r0)[0] >= 5
    await routers.close()


async def test_a_failed_replica_fails_each_route_over(replicas: list[Replica]) -> None:
    r0, r1 = replicas
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every batch is UNAVAILABLE
    routers = client([dead, r1.address])
    routed = await asyncio.gather(*(routers.route(f"f{i}", "m", PROMPT, 8)
                                    for i in range(12)))
    assert {r.router for r in routed} == {r1.address}
    assert routers.replicas.available() == [r1.address]
    assert routers.metrics.router_failovers.labels(dead)._value.get() >= 1
    assert batches(r1)[1] == 12 and booked(r1) == {f"f{i}" for i in range(12)}
    # A replica stopped while routes are out: they go to the next one too.
    routers = client([r0.address, r1.address])
    await r0.server.stop(None)
    again = await asyncio.gather(*(routers.route(f"g{i}", "m", PROMPT, 8) for i in range(6)))
    assert {r.router for r in again} == {r1.address}
    await routers.close()


async def test_a_lost_worker_is_reported_to_every_replica(replicas: list[Replica]) -> None:
    r0, r1 = replicas
    routers = client([r0.address, r1.address])
    routed = await routers.route("l", "m", PROMPT, 8)
    await routers.finished("l", routed.decision.worker.worker_id, routed.router,
                           worker_failed=True)
    assert r0.suspected == r1.suspected == [routed.decision.worker.worker_id]
    assert booked(r0) == set()  # at once, not with a later batch
    await routers.close()


async def test_a_route_waiting_for_a_slot_holds_no_other_back() -> None:
    """Admission (one request per worker): a request of `m2`, whose one worker is busy,
    waits at the router on a Route call of its own; a request of `m` sent in the same
    batch is answered at once, not when the slot frees."""
    replica = await start_replica(RouterConfig(metrics_port=None, seed=0,
                                               max_inflight_per_worker=1,
                                               admission_max_wait_s=10))
    routers = client([replica.address])
    first = await routers.route("busy", "m2", PROMPT, 8)
    waiting = asyncio.create_task(routers.route("waits", "m2", PROMPT, 8))
    other = asyncio.create_task(routers.route("free", "m", PROMPT, 8))
    done = await asyncio.wait_for(other, 2)
    assert done.decision.worker.worker_id in {"a", "b"} and not waiting.done()
    await asyncio.sleep(0.3)
    assert not waiting.done()  # held at the router for its slot...
    assert replica.route_calls == 1  # ...on a Route call of its own
    await routers.finished("busy", first.decision.worker.worker_id, first.router)
    second = await asyncio.wait_for(waiting, 5)
    assert second.decision.worker.worker_id == "c"
    await routers.close()
    await replica.server.stop(None)


async def test_with_tracing_on_each_request_has_its_route_call(
        replicas: list[Replica], monkeypatch: pytest.MonkeyPatch) -> None:
    r0, _ = replicas
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    routers = client([r0.address])
    routed = await asyncio.gather(*(routers.route(f"t{i}", "m", PROMPT, 8) for i in range(5)))
    assert r0.route_calls == 5 and batches(r0)[0] == 0
    await routers.finished("t0", routed[0].decision.worker.worker_id, routed[0].router)
    assert "t0" not in booked(r0)  # a RequestFinished call of its own, answered
    assert batches(r0)[0] == 0
    await routers.close()


async def test_a_replica_that_does_not_know_a_served_model_yet_is_passed_over(
        replicas: list[Replica]) -> None:
    # r0 has just restarted: no worker has registered with it again. The gateway's
    # watched worker set (from r1) serves the model, so r0's "model not found" is the
    # router being behind, not the client's mistake: r1 answers.
    r0, r1 = replicas
    for wid in ("a", "b", "c"):
        r0.core.registry.remove(wid)
    watched = [common_pb2.WorkerInfo(worker_id="a", model="m")]
    routers = RouterClient([r0.address, r1.address], route_timeout_s=5, retry_s=60,
                           workers=lambda: (watched, set()))
    routed = await routers.route("q", "m", PROMPT, 8)
    assert routed.router == r1.address
    # A model no worker serves is the client's mistake, whichever replica says so.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await routers.route("bad", "no-such-model", PROMPT, 8)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await routers.close()


async def test_batches_reach_a_router_without_routestream_as_unary_calls() -> None:
    old = await start_replica(servicer_class=OldServicer)
    routers = client([old.address])
    routed = await asyncio.gather(*(routers.route(f"o{i}", "m", PROMPT, 8) for i in range(8)))
    assert {r.router for r in routed} == {old.address}  # no failover: it answered
    assert routers.streams[0].unsupported and old.unary_batch_calls >= 1
    assert batches(old)[1] == 8 and booked(old) == {f"o{i}" for i in range(8)}
    await routers.close()
    await old.server.stop(None)


async def test_a_restarted_router_gets_a_new_stream() -> None:
    """The stream to a router that went away ends; the batches after its restart (same
    address) go out on a new stream, while the replica's rest lets the other answer."""
    first, other = await start_replica(), await start_replica()
    routers = RouterClient([first.address, other.address], route_timeout_s=5,
                           retry_s=0.2, workers=lambda: ([], set()))
    assert (await routers.route("before", "m", PROMPT, 8)).router == first.address
    await first.server.stop(None)
    during = await routers.route("during", "m", PROMPT, 8)
    assert during.router == other.address
    again = await start_replica(port=int(first.address.rsplit(":", 1)[1]))
    await asyncio.sleep(0.3)  # the replica's rest is over
    opened = routers.streams[0].opened  # the first, and one that failed meanwhile
    after = await routers.route("after", "m", PROMPT, 8)
    assert after.router == again.address and "after" in booked(again)
    assert routers.streams[0].opened == opened + 1 and again.unary_batch_calls == 0
    await routers.close()
    for r in (other, again):
        await r.server.stop(None)


async def test_a_stalled_or_warming_router_is_failed_over(replicas: list[Replica]) -> None:
    r0, r1 = replicas

    async def stalled(*args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(30)

    r0.servicer._batch = stalled  # type: ignore[method-assign]
    routers = RouterClient([r0.address, r1.address], route_timeout_s=0.5, retry_s=60,
                           workers=lambda: ([], set()))
    started = asyncio.get_running_loop().time()
    routed = await routers.route("s", "m", PROMPT, 8)
    assert routed.router == r1.address  # after the batch's timeout, no longer
    assert asyncio.get_running_loop().time() - started < 3
    await routers.close()
    # Warming up (a restarted router waiting for its workers): each request of the
    # stream's batch fails UNAVAILABLE without details, as a RouteBatch call would.
    del r0.servicer._batch
    r0.servicer.lifecycle.warming = lambda: "warming up"  # type: ignore[method-assign]
    routers = client([r0.address, r1.address])
    routed = await routers.route("w", "m", PROMPT, 8)
    assert routed.router == r1.address and booked(r0) == set()
    assert routers.metrics.router_failovers.labels(r0.address)._value.get() == 1
    await routers.close()
