"""The control plane as a process of its own: the ADS server, the gateway source it
follows (the router's registered gateways and/or a fixed list), and optionally the
Envoy it configures, started and stopped with it."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from kvmesh.core.edge_config import EdgeServiceConfig
from kvmesh.core.processes import terminate
from kvmesh.core.service_main import write_ready_file
from kvmesh.edge.control_plane import EdgeControlPlane
from kvmesh.edge.envoy import start_envoy, wait_envoy_live
from kvmesh.edge.resources import Gateway
from kvmesh.edge.sources import GatewaySet, fixed_gateways, router_gateways

log = logging.getLogger(__name__)


def gateway_source(config: EdgeServiceConfig) -> AsyncIterator[GatewaySet]:
    """The router's registered gateways plus the fixed ones, or the fixed ones alone."""
    fixed = [Gateway(http=g.http, grpc=g.grpc) for g in config.gateways]
    if config.router:
        return router_gateways(config.router, always=fixed)
    return fixed_gateways(fixed)


class EdgeService:
    def __init__(self, config: EdgeServiceConfig) -> None:
        self.config = config
        self.control_plane = EdgeControlPlane(config.listen, config.host, config.port,
                                              config.picker)
        self.envoy: subprocess.Popen[bytes] | None = None
        self.admin = ""

    async def start(self) -> str:
        config = self.config
        address = await self.control_plane.start()
        self.control_plane.follow(gateway_source(config))
        ready: dict[str, object] = {"ads": address, "listen": config.listen}
        if config.envoy:
            run_dir = config.run_dir or Path(tempfile.mkdtemp(prefix="kvmesh-edge-"))
            self.envoy = start_envoy(address, config.admin_port, run_dir, config.node_id)
            try:
                self.admin = await wait_envoy_live(self.envoy, run_dir,
                                                   config.envoy_startup_timeout_s)
            except RuntimeError:
                await self.stop()
                raise
            ready |= {"admin": self.admin, "envoy_pid": self.envoy.pid,
                      "envoy_log": str(run_dir / "envoy.log")}
            log.info("Envoy (pid %d) serving %s, admin %s, log %s", self.envoy.pid,
                     config.listen, self.admin, run_dir / "envoy.log")
        write_ready_file(config.ready_file, ready)
        log.info("edge control plane (ADS) on %s for listener %s, gateways from %s",
                 address, config.listen, config.router or "the configured list")
        return address

    async def stop(self) -> None:
        if self.envoy is not None:
            await asyncio.to_thread(terminate, self.envoy)
        await self.control_plane.stop()
