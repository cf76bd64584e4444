"""A worker finds a router that was down for seconds again within a second of its
return (real gRPC, in process): a restarted router's warm-up waits only so long for
its snapshot's workers (router/warmup.py), and gRPC's default reconnect backoff (1 s,
growing 1.6× per attempt to 120 s) had a worker come back 3.7–4 s after a 6 s outage —
after that warm-up had given up and told the gateways that the model was gone."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kvmesh.core.grpc_util import RECONNECT_BACKOFF_MAX_S
from kvmesh.core.net import free_port
from kvmesh.core.registration import Registration
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration
BEAT_S = 0.2


class Router(router_pb2_grpc.RouterServicer):
    """Registration and heartbeats only: who registered, and when."""

    def __init__(self) -> None:
        self.registered: dict[str, float] = {}

    async def RegisterWorker(self, request: router_pb2.RegisterWorkerRequest,
                             context: grpc.aio.ServicerContext
                             ) -> router_pb2.RegisterWorkerResponse:
        self.registered[request.worker.worker_id] = time.monotonic()
        return router_pb2.RegisterWorkerResponse(worker=request.worker,
                                                 heartbeat_interval_s=BEAT_S)

    async def Heartbeat(self, request: router_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> router_pb2.HeartbeatResponse:
        return router_pb2.HeartbeatResponse(known=request.worker_id in self.registered)


async def serve(port: int) -> tuple[grpc.aio.Server, Router]:
    server, router = grpc.aio.server(), Router()
    router_pb2_grpc.add_RouterServicer_to_server(router, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, router


async def registered(router: Router, worker_id: str, within_s: float) -> float:
    deadline = time.monotonic() + within_s
    while worker_id not in router.registered and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert worker_id in router.registered, f"{worker_id} did not register in {within_s} s"
    return router.registered[worker_id]


def test_worker_registers_again_within_a_second_of_the_routers_return() -> None:
    async def main() -> float:
        port = free_port()
        server, router = await serve(port)
        registration = Registration(f"127.0.0.1:{port}", common_pb2.WorkerInfo(
            worker_id="w0", endpoint="127.0.0.1:1", model="m"), token=None)
        registration.start()
        try:
            await registered(router, "w0", 10)
            await server.stop(None)
            await asyncio.sleep(6.0)  # the router away, as in a restart that takes a while
            server, router = await serve(port)
            back = time.monotonic()
            return await registered(router, "w0", 10) - back
        finally:
            await registration.stop()
            await server.stop(None)

    delay = asyncio.run(main())
    # Reconnect backoff (jittered by 20%) plus one beat, and some slack for the loop.
    assert delay < 1.2 * RECONNECT_BACKOFF_MAX_S + BEAT_S + 0.3, delay


class RefusingRouter(router_pb2_grpc.RouterServicer):
    """A router that is up but refuses this process's token, as a router with an
    internal token refuses a worker or gateway started without it."""

    def __init__(self) -> None:
        self.attempts: list[float] = []

    async def RegisterWorker(self, request: router_pb2.RegisterWorkerRequest,
                             context: grpc.aio.ServicerContext
                             ) -> router_pb2.RegisterWorkerResponse:
        self.attempts.append(time.monotonic())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing internal token")
        raise AssertionError("unreachable")


def test_a_refused_registration_is_one_clear_error_and_asked_again_less_often(
        caplog: pytest.LogCaptureFixture) -> None:
    """A refusal is a configuration error: it is logged once, as an error naming the
    token to set, and asked again at doubling intervals — not warned about and retried
    every second for as long as the process lives."""
    async def main() -> list[float]:
        server, router = grpc.aio.server(), RefusingRouter()
        router_pb2_grpc.add_RouterServicer_to_server(router, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        registration = Registration(f"127.0.0.1:{port}", common_pb2.WorkerInfo(
            worker_id="gateway-x", endpoint="127.0.0.1:1", model=""), token=None)
        registration.start()
        try:
            await asyncio.sleep(6.5)
        finally:
            await registration.stop()
            await server.stop(None)
        return router.attempts

    with caplog.at_level("WARNING", logger="kvmesh.core.registration"):
        attempts = asyncio.run(main())
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    # Asked at 0, ~2 and ~6 s (a 1 s retry would have asked 6 or 7 times).
    assert len(attempts) == 3, gaps
    assert gaps[1] > gaps[0] * 1.5, gaps
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelname == "ERROR"
    assert "KVMESH_INTERNAL_TOKEN" in refusals[0].getMessage()
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
