"""The edge's control plane: an ADS gRPC server (with health and reflection) whose
snapshots follow the set of gateway replicas, and the Envoy it configures.

``EdgeControlPlane.set_gateways`` publishes a new version whenever the set changes, and
``follow`` does so for every set a source yields (``edge/sources.py``: a fixed list or
the router's registered gateways); Envoy applies it live (no restart, connections to a
removed gateway drain). Envoy itself is bootstrapped with nothing but the control
plane's address (``edge/envoy.py``); listeners, routes, clusters and endpoints all
arrive over ADS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc

from kvmesh.core.grpc_util import add_health_and_reflection, bind, create_server, set_serving
from kvmesh.edge.ads import AdsServicer, SnapshotStore
from kvmesh.edge.resources import Gateway, resources
from kvmesh.edge.sources import GatewaySet, gateway_set

log = logging.getLogger(__name__)
ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name


class EdgeControlPlane:
    def __init__(self, edge_address: str, host: str = "127.0.0.1", port: int = 0,
                 picker: bool = False) -> None:
        self.edge_address = edge_address
        self.picker = picker
        self.store = SnapshotStore()
        self.gateways: GatewaySet = ()
        self._follower: asyncio.Task[None] | None = None
        self._host, self._port = host, port
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        server = create_server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            AdsServicer(self.store), server)
        health = add_health_and_reflection(server, [ADS_SERVICE])
        port = bind(server, self._host, self._port)
        await server.start()
        await set_serving(health, ["", ADS_SERVICE])
        self._server = server
        self.address = f"{self._host}:{port}"
        return self.address

    async def set_gateways(self, gateways: Sequence[Gateway]) -> int:
        """Publish the edge for this set of gateways; returns the new version."""
        self.gateways = gateway_set(gateways)
        version = await self.store.publish(resources(self.edge_address, self.gateways,
                                                     self.picker))
        log.info("edge version %d: %d gateway(s) %s", version, len(self.gateways),
                 ", ".join(g.http for g in self.gateways))
        return version

    def follow(self, source: AsyncIterator[GatewaySet]) -> None:
        """Publish every set ``source`` yields that differs from the current one (in
        the background, until ``stop``)."""

        async def run() -> None:
            async for gateways in source:
                if gateway_set(gateways) != self.gateways or not self.store.snapshot.version:
                    await self.set_gateways(gateways)

        self._follower = asyncio.create_task(run())

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._server is not None:
            await self._server.stop(grace=1.0)
