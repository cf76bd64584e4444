"""The images' HEALTHCHECK command against a real kvmesh gRPC server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from grpc_health.v1 import health_pb2

from kvmesh.core.grpc_util import add_health_and_reflection, bind, create_server, set_serving
from kvmesh.core.health_probe import probe

pytestmark = pytest.mark.integration


def test_probe_reports_serving_then_not_serving_then_unreachable() -> None:
    async def main() -> None:
        server = create_server()
        health = add_health_and_reflection(server, ["kvmesh.v1.Router"])
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        target = f"127.0.0.1:{port}"
        await set_serving(health, ["", "kvmesh.v1.Router"])
        assert await asyncio.to_thread(probe, target) == "SERVING"
        cli = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "kvmesh.core.health_probe", target, "kvmesh.v1.Router"],
            capture_output=True, text=True, timeout=60)
        assert (cli.returncode, cli.stdout.strip()) == (0, "SERVING")
        await health.set("kvmesh.v1.Router", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await asyncio.to_thread(probe, target, "kvmesh.v1.Router") == "NOT_SERVING"
        await server.stop(None)
        assert await asyncio.to_thread(probe, target, "", 1.0) in ("UNAVAILABLE",
                                                                  "DEADLINE_EXCEEDED")

    asyncio.run(main())
