"""kvmesh's ADS server over real gRPC on 127.0.0.1, with a scripted client in Envoy's
place: the conversation's order, versions, nonces, ACKs and NACKs (fast, no Envoy)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.edge.control_plane import ADS_SERVICE, EdgeControlPlane
from kvmesh.edge.resources import CLUSTER, ENDPOINT, LISTENER, ORDER, ROUTE, Gateway

pytestmark = pytest.mark.integration
A = Gateway(http="127.0.0.1:9001", grpc="127.0.0.1:9101")
B = Gateway(http="127.0.0.1:9002", grpc="127.0.0.1:9102")


class FakeEnvoy:
    """One ADS stream, driven request by request."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call = stub.StreamAggregatedResources(self._requests())

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await self.requests.get()

    async def send(self, type_url: str, version: str = "", nonce: str = "",
                   error: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id="fake-envoy"), type_url=type_url, version_info=version,
            response_nonce=nonce)
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.requests.put(request)

    async def receive(self) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.call.read(), 5)


@pytest.fixture
async def plane() -> AsyncIterator[EdgeControlPlane]:
    plane = EdgeControlPlane("127.0.0.1:8080")
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


async def until(check, timeout_s: float = 5) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_versions_go_out_in_order_and_acks_and_nacks_are_booked(
        plane: EdgeControlPlane, caplog: pytest.LogCaptureFixture) -> None:
    async with grpc.aio.insecure_channel(plane.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=ADS_SERVICE), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        envoy = FakeEnvoy(channel)
        for type_url in ORDER:
            await envoy.send(type_url)
        await plane.set_gateways([A])
        first = [await envoy.receive() for _ in ORDER]
        assert [r.type_url for r in first] == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
        assert {r.version_info for r in first} == {"1"}
        for response in first:
            await envoy.send(response.type_url, "1", response.nonce)
        state = plane.store.streams["fake-envoy"]
        await until(lambda: state.applied(1))

        await plane.set_gateways([A, B])
        second = {r.type_url: r for r in [await envoy.receive() for _ in ORDER]}
        with caplog.at_level(logging.ERROR, logger="kvmesh.edge.ads"):
            await envoy.send(CLUSTER, "1", second[CLUSTER].nonce, error="bad cluster")
            for type_url in (ENDPOINT, LISTENER, ROUTE):
                await envoy.send(type_url, "2", second[type_url].nonce)
            await until(lambda: state.acked.get(ROUTE) == "2")
        assert state.acked[CLUSTER] == "1"  # Envoy keeps the last good clusters
        assert state.nacks[CLUSTER] == ["bad cluster"] and state.rejected[CLUSTER] == [2]
        assert "rejected Cluster version 2 (keeps version 1): bad cluster" in caplog.text

        await plane.set_gateways([B])  # the next version supersedes the rejected one
        third = [await envoy.receive() for _ in ORDER]
        assert {r.version_info for r in third} == {"3"}
        for response in third:
            await envoy.send(response.type_url, "3", response.nonce)
        await until(lambda: state.applied(3))
        envoy.call.cancel()
