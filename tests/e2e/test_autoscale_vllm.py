"""The autoscaler on real vLLM (CPU): `kvmesh up --autoscale 2` starts one worker, load
makes the router ask for a second, which `kvmesh up` starts as a Ray actor; when the load
goes, the second is drained and stopped. No request fails on the way."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.v1 import router_pb2, router_pb2_grpc

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e
CONFIG = """router:
  autoscale:
    target_requests_per_worker: 2
    scale_up_window_s: 2
    scale_down_window_s: 5
    scale_up_cooldown_s: 2
    scale_down_cooldown_s: 5
"""


async def pool(router: str) -> tuple[int, int]:
    """(registered, desired) workers of the chat pool."""
    async with grpc.aio.insecure_channel(router) as channel:
        reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
            router_pb2.ListWorkersRequest(model=MODEL), timeout=5)
    (status,) = [p for p in reply.pools if p.role == "both"]
    return len(reply.workers), status.desired


async def test_load_scales_real_workers_one_to_two_and_back(model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kvm-as-") as d:
        (Path(d) / "mesh.yaml").write_text(CONFIG)
        up = UpProcess(Path(d), ("--workers", "1"), ("--autoscale", "2", "--no-embeddings",
                                                      "--config", str(Path(d) / "mesh.yaml")))
        router, http = up.state["router"], up.state["http"]
        failures: list[str] = []
        served = 0
        busy = True

        async def client(i: int) -> None:
            nonlocal served
            async with httpx.AsyncClient(timeout=300) as c:
                while busy:
                    r = await c.post(f"{http}/chat/completions", json={
                        "model": MODEL, "max_tokens": 48, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Count to ten, {i}."}]})
                    served += 1
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:300]}")

        try:
            assert await pool(router) == (1, 1)
            started = time.monotonic()
            clients = [asyncio.create_task(client(i)) for i in range(6)]
            while (await pool(router))[0] < 2:  # the second worker registered
                assert time.monotonic() - started < 400, await pool(router)
                await asyncio.sleep(1)
            up_s = time.monotonic() - started
            busy = False
            await asyncio.gather(*clients)
            stopped = time.monotonic()
            while (await pool(router))[0] > 1:
                assert time.monotonic() - stopped < 120, await pool(router)
                await asyncio.sleep(0.5)
            down_s = time.monotonic() - stopped
            print(f"\nreal vLLM autoscale: 1 -> 2 workers {up_s:.0f}s after the load began, "
                  f"back to 1 {down_s:.0f}s after it ended; {served} requests, "
                  f"{len(failures)} failed")
            assert failures == []
            async with httpx.AsyncClient(timeout=120) as c:  # the one left serves
                r = await c.post(f"{http}/chat/completions", json={
                    "model": MODEL, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
        except BaseException:
            up.dump()
            raise
        finally:
            assert up.interrupt() == 0
