"""Where the control plane learns the gateway set: an async iterator of sets (the seam).

``EdgeControlPlane.follow`` publishes a new version for each set that differs from the
last, so anything that yields ``GatewaySet``s can drive Envoy: a fixed list
(``fixed_gateways``), or the router's registry (``router_gateways``), where gateway
replicas register and heartbeat like workers and ``WatchWorkers`` lists them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

import grpc

from kvmesh.core.grpc_util import internal_channel
from kvmesh.edge.resources import Gateway
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

GatewaySet = tuple[Gateway, ...]


def gateway_set(gateways: Iterable[Gateway]) -> GatewaySet:
    """One order for one set (by HTTP address), so equal sets compare equal."""
    return tuple(sorted(set(gateways), key=lambda g: (g.http, g.grpc)))


def gateways_of(worker_set: router_pb2.WorkerSet) -> GatewaySet:
    """The gateway replicas a WatchWorkers message lists (workers are not endpoints)."""
    return gateway_set(Gateway(http=g.http_endpoint, grpc=g.endpoint)
                       for g in worker_set.gateways
                       if g.role == common_pb2.WORKER_ROLE_GATEWAY and g.http_endpoint)


async def fixed_gateways(gateways: Iterable[Gateway]) -> AsyncIterator[GatewaySet]:
    """A set that never changes: yielded once, then the source stays open."""
    yield gateway_set(gateways)
    await asyncio.Event().wait()


async def router_gateways(router: str, always: Iterable[Gateway] = (),
                          retry_s: float = 1.0) -> AsyncIterator[GatewaySet]:
    """The gateways registered with ``router``, again on every change, plus ``always``.

    A lost stream is re-opened every ``retry_s``; meanwhile nothing is yielded, so Envoy
    keeps the last set (a router restart must not empty the edge). After a
    reconnection the router's current set arrives first, so a change missed while
    disconnected is caught up."""
    fixed = tuple(always)
    async with internal_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while True:
            try:
                async for worker_set in stub.WatchWorkers(router_pb2.WatchWorkersRequest()):
                    yield gateway_set((*fixed, *gateways_of(worker_set)))
            except grpc.aio.AioRpcError as exc:
                log.warning("WatchWorkers on router %s: %s; retrying in %.1fs", router,
                            exc.code().name, retry_s)
            await asyncio.sleep(retry_s)
