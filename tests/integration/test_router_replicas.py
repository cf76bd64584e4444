"""The router is no single point of failure (fake engines, real processes): two router
replicas fed by every worker, a gateway given both. Under steady load, one replica is
SIGKILLed, then the other (no router at all: the gateway routes on its own over its
last worker set), then one comes back on its address and takes the routing back.
Goal: 0 failed requests throughout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.prom import Scrape

from .conftest import Mesh, router_ready, running_mesh, spawn_router, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
CONCURRENCY = 8


def snapshots(mesh: Mesh, name: str) -> dict[str, str]:
    """Each replica snapshots (as `kvmesh up` has them do): a restart knows its workers."""
    return {"KVMESH_ROUTER_SNAPSHOT_PATH": str(mesh.dir / f"{name}.npz"),
            "KVMESH_ROUTER_SNAPSHOT_INTERVAL_S": "0.5"}


@pytest.fixture
def mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        r0 = start_router(mesh, "r0", env=snapshots(mesh, "r0"))
        r1 = start_router(mesh, "r1", env=snapshots(mesh, "r1"))
        mesh.router = f"{r0},{r1}"
        mesh.workers = [mesh.start_worker("w0"), mesh.start_worker("w1")]
        mesh.start_gateway()
        yield mesh


class Load:
    """CONCURRENCY clients sending short chats back to back; failures counted per phase."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.phase = "baseline"
        self.ok: dict[str, int] = {}
        self.failed: dict[str, list[str]] = {}
        self._stop = False

    async def _client(self, i: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            n = 0
            while not self._stop:
                phase = self.phase
                n += 1
                try:
                    reply = await client.post(f"{self.base_url}/chat/completions", json={
                        "model": MODEL, "max_tokens": 6,
                        "messages": [{"role": "user", "content": f"client {i} turn {n}"}]})
                    good = reply.status_code == 200
                    why = f"HTTP {reply.status_code}: {reply.text[:200]}"
                except httpx.HTTPError as exc:
                    good, why = False, repr(exc)
                if good:
                    self.ok[phase] = self.ok.get(phase, 0) + 1
                else:
                    self.failed.setdefault(phase, []).append(why)

    async def run(self, script: asyncio.Future[None]) -> None:
        clients = [asyncio.create_task(self._client(i)) for i in range(CONCURRENCY)]
        try:
            await script
        finally:
            self._stop = True
            await asyncio.gather(*clients)


def _gateway_metric(mesh: Mesh, name: str) -> float:
    return Scrape(httpx.get(mesh.http.removesuffix("/v1") + "/metrics", timeout=5).text
                  ).total(name)


def _router_decisions(mesh: Mesh, name: str) -> float:
    metrics = json.loads((mesh.dir / f"{name}.ready").read_text())["metrics"]
    return Scrape.of(metrics).total("kvmesh_router_decisions_total")


def test_replica_killed_then_none_then_one_back(mesh: Mesh) -> None:
    load = Load(mesh.http)
    figures: dict[str, float] = {}
    r0_port = mesh.router.split(",")[0].rsplit(":", 1)[1]

    async def script() -> None:
        await asyncio.sleep(1.5)
        load.phase = "one replica killed"
        os.kill(mesh.procs["r0"].pid, signal.SIGKILL)
        await asyncio.sleep(2.5)
        load.phase = "no router"
        os.kill(mesh.procs["r1"].pid, signal.SIGKILL)
        await asyncio.sleep(2.5)
        figures["local_routes"] = _gateway_metric(mesh, "kvmesh_gateway_local_routes_total")
        load.phase = "router back"
        restarted = time.monotonic()
        spawn_router(mesh, "r0-again", "--port", r0_port, env=snapshots(mesh, "r0"))
        await asyncio.to_thread(router_ready, mesh, "r0-again")
        ready = time.monotonic()
        # Back to the router: it routes again (its decisions count up), and the gateway's
        # own routing stops.
        while time.monotonic() - ready < 15:
            if _router_decisions(mesh, "r0-again") > 0:
                break
            await asyncio.sleep(0.05)
        figures["router_back_s"] = time.monotonic() - ready
        figures["router_start_s"] = ready - restarted
        local = _gateway_metric(mesh, "kvmesh_gateway_local_routes_total")
        await asyncio.sleep(1.5)
        figures["local_routes_after_back"] = (
            _gateway_metric(mesh, "kvmesh_gateway_local_routes_total") - local)

    async def main() -> None:
        await load.run(asyncio.ensure_future(script()))

    asyncio.run(main())
    print(f"\nrequests ok per phase: {load.ok}; failed: "
          f"{ {k: len(v) for k, v in load.failed.items()} }; {figures}")
    assert not load.failed, load.failed
    assert all(load.ok.get(p, 0) > 20 for p in ("baseline", "one replica killed",
                                                "no router", "router back"))
    assert figures["local_routes"] > 20  # the gateway routed on its own meanwhile
    assert figures["router_back_s"] < 5
    assert figures["local_routes_after_back"] == 0
