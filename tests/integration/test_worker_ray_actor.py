"""`python -m kvmesh.worker` runs its worker as a Ray actor by default (fake engine)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from kvmesh.launch.procs import pid_alive, spawn_module, wait_ready_file
from kvmesh.v1 import router_pb2, router_pb2_grpc

from .conftest import Mesh, start_router

pytestmark = pytest.mark.integration


def test_worker_as_ray_actor_registers_and_stops(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    router = start_router(mesh)
    ready = tmp_path / "actor.ready"
    proc = spawn_module(
        "kvmesh.worker",
        ["--engine-kind", "fake", "--port", "0", "--router", router, "--worker-id", "ray-w",
         "--run-dir", str(tmp_path), "--ready-file", str(ready)],
        tmp_path / "actor.log",
    )
    mesh.procs["actor"] = proc
    try:
        info = wait_ready_file(ready, 120, proc, "ray worker")
        assert info["pid"] != proc.pid  # the engine lives in the actor's process

        async def workers() -> list[str]:
            async with grpc.aio.insecure_channel(router) as channel:
                reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
                    router_pb2.ListWorkersRequest())
                return [s.worker.worker_id for s in reply.workers]

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and asyncio.run(workers()) != ["ray-w"]:
            time.sleep(0.1)
        assert asyncio.run(workers()) == ["ray-w"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and pid_alive(info["pid"]):
            time.sleep(0.1)
        assert not pid_alive(info["pid"])
        assert asyncio.run(workers()) == []  # deregistered on the way out
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        for p in mesh.procs.values():
            if p.poll() is None:
                p.kill()
