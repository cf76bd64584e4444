"""`kvmesh up --edge`: the xDS control plane (in this process) and Envoy in front of
the gateway replicas `kvmesh up` started."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvmesh.core.config import EdgeConfig
from kvmesh.core.net import free_port
from kvmesh.edge.control_plane import EdgeControlPlane
from kvmesh.edge.envoy import start_envoy, wait_envoy_live
from kvmesh.edge.resources import Gateway
from kvmesh.launch.procs import terminate


@dataclass
class RunningEdge:
    control_plane: EdgeControlPlane
    envoy: subprocess.Popen[bytes]
    address: str  # host:port of Envoy's listener: HTTP and gRPC
    admin: str

    async def stop(self) -> None:
        await asyncio.to_thread(terminate, self.envoy)
        await self.control_plane.stop()


async def start_edge(config: EdgeConfig, host: str, port: int, gateways: list[Gateway],
                     run_dir: Path, timeout_s: float = 60.0) -> RunningEdge:
    """Control plane up with the gateways, Envoy started from it, ready when Envoy
    answers /health through a gateway."""
    address = f"{host}:{port or free_port(host)}"
    control_plane = EdgeControlPlane(address, port=config.control_plane_port,
                                     picker=config.picker)
    await control_plane.start()
    await control_plane.set_gateways(gateways)
    envoy = start_envoy(control_plane.address, config.admin_port, run_dir)
    edge = RunningEdge(control_plane, envoy, address, "")
    deadline = time.monotonic() + timeout_s
    try:
        edge.admin = await wait_envoy_live(envoy, run_dir, timeout_s)
    except RuntimeError:
        await edge.stop()
        raise
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                if (await client.get(f"http://{address}/health")).status_code == 200:
                    return edge
            except httpx.HTTPError:
                pass
            if envoy.poll() is not None or time.monotonic() > deadline:
                await edge.stop()
                log = (run_dir / "envoy.log").read_text()[-2000:]
                raise RuntimeError(f"Envoy did not come up at {address}:\n{log}")
            await asyncio.sleep(0.1)
