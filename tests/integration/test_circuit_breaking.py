"""Per-worker circuit breaking through real router and gateway processes: a worker that
answers the router's probes but fails every generation is ejected after
``consecutive_failures`` failures, gets no call while ejected, one trial call after,
and is ejected again (for longer) when the trial fails. Clients see no error: each
failed call was retried on the healthy worker."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.core.internal_auth import token_metadata
from kvmesh.core.security_config import SecurityConfig
from kvmesh.launch.procs import spawn_module, wait_ready_file
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
EJECTION_S = 3.0


@pytest.fixture
def mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        mesh.start_worker("good")
        ready = mesh.dir / "bad.ready"
        mesh.procs["bad"] = spawn_module(
            "tests.failing_worker", [str(model_dir), str(ready), str(mesh.dir / "calls")],
            mesh.dir / "bad.log")
        bad = wait_ready_file(ready, 30, mesh.procs["bad"], "failing worker")

        async def register() -> None:
            async with grpc.aio.insecure_channel(mesh.router) as channel:
                await router_pb2_grpc.RouterStub(channel).RegisterWorker(
                    router_pb2.RegisterWorkerRequest(worker=common_pb2.WorkerInfo(
                        worker_id="bad", endpoint=bad["endpoint"], self_registered=False)),
                    timeout=10, metadata=token_metadata(SecurityConfig().internal_token))

        asyncio.run(register())
        mesh.start_gateway(env={
            **os.environ, "KVMESH_GATEWAY_OUTLIER__CONSECUTIVE_FAILURES": "2",
            "KVMESH_GATEWAY_OUTLIER__BASE_EJECTION_S": str(EJECTION_S)})
        yield mesh


def calls(mesh: Mesh) -> int:
    path = mesh.dir / "calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def chat(mesh: Mesh) -> None:
    reply = httpx.post(f"{mesh.http}/chat/completions", timeout=30, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text


def ejections(mesh: Mesh) -> float:
    text = httpx.get(mesh.http.removesuffix("/v1") + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvmesh_gateway_worker_ejections_total{"))


def test_failing_worker_is_ejected_then_tried_again(mesh: Mesh) -> None:
    for _ in range(12):  # round robin: without ejection, about half would go to `bad`
        chat(mesh)
    print(f"\n12 requests: the failing worker got {calls(mesh)} calls "
          f"(ejected after 2 failures in a row), 0 client errors")
    assert calls(mesh) == 2 and ejections(mesh) == 1
    started = time.monotonic()
    while time.monotonic() - started < EJECTION_S + 0.5:
        chat(mesh)
    # The ejection ended: one trial call, which failed, ejected it again (for 2×).
    assert calls(mesh) == 3 and ejections(mesh) == 2
    for _ in range(6):
        chat(mesh)
    assert calls(mesh) == 3
