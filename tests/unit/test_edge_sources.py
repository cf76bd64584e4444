"""Where the control plane's gateway set comes from, and how a source drives versions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kvmesh.edge.control_plane import EdgeControlPlane
from kvmesh.edge.resources import ENDPOINT, Gateway
from kvmesh.edge.sources import GatewaySet, fixed_gateways, gateway_set, gateways_of
from kvmesh.v1 import common_pb2, router_pb2

pytestmark = pytest.mark.unit
A = Gateway(http="127.0.0.1:9001", grpc="127.0.0.1:9101")
B = Gateway(http="127.0.0.1:9002", grpc="127.0.0.1:9102")


def test_only_registered_gateways_are_endpoints() -> None:
    worker_set = router_pb2.WorkerSet(
        workers=[common_pb2.WorkerInfo(worker_id="w0", endpoint="127.0.0.1:7000")],
        gateways=[
            common_pb2.WorkerInfo(worker_id="g2", endpoint=B.grpc, http_endpoint=B.http,
                                  role=common_pb2.WORKER_ROLE_GATEWAY),
            common_pb2.WorkerInfo(worker_id="g1", endpoint=A.grpc, http_endpoint=A.http,
                                  role=common_pb2.WORKER_ROLE_GATEWAY),
            common_pb2.WorkerInfo(worker_id="odd", endpoint="127.0.0.1:1",
                                  role=common_pb2.WORKER_ROLE_GATEWAY),  # no HTTP address
        ])
    assert gateways_of(worker_set) == (A, B)


def test_a_set_has_one_order() -> None:
    assert gateway_set([B, A, B]) == gateway_set([A, B]) == (A, B)


async def test_a_fixed_source_yields_once_and_stays_open() -> None:
    source = fixed_gateways([B, A])
    assert await anext(source) == (A, B)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(source), 0.05)


async def test_following_a_source_publishes_only_changes() -> None:
    sets = [(A,), (A,), (A, B), (B, A), (B,)]
    consumed = asyncio.Event()

    async def source() -> AsyncIterator[GatewaySet]:
        for gateways in sets:
            yield gateways
        consumed.set()
        await asyncio.Event().wait()

    plane = EdgeControlPlane("127.0.0.1:8080")
    plane.follow(source())
    await asyncio.wait_for(consumed.wait(), 5)
    await plane.stop()
    assert plane.store.snapshot.version == 3  # {A}, {A, B}, {B}
    assert plane.gateways == (B,)
    (http, grpc) = plane.store.snapshot.resources[ENDPOINT]
    assert len(http.endpoints[0].lb_endpoints) == 1
