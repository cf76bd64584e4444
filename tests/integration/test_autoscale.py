"""The autoscaler end to end on fake-engine workers: the router decides each pool's
desired size from the load, a Scaler starts and drains worker processes to match, and a
scripted load curve takes the pool 1 → 3 → 1 with no failed request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kvmesh.core.config import WorkerConfig
from kvmesh.launch.scaler import ProcessPool, Scaler

from .conftest import running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
AUTOSCALE = """autoscale:
  enabled: true
  min_workers: 1
  max_workers: 3
  target_requests_per_worker: 2
  scale_up_window_s: 1
  scale_down_window_s: 3
  scale_up_cooldown_s: 1
  scale_down_cooldown_s: 2
"""


class Load:
    """``clients`` concurrent streaming chats, each request to the end, all counted."""

    def __init__(self, http: str) -> None:
        self.http, self.clients = http, 0
        self.served = 0
        self.failures: list[str] = []

    async def client(self, index: int) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while True:
                if index >= self.clients:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    async with http.stream("POST", f"{self.http}/chat/completions", json={
                            "model": MODEL, "max_tokens": 30, "stream": True,
                            "messages": [{"role": "user", "content": f"hi {index}"}]}) as r:
                        body = (await r.aread()).decode()
                    if r.status_code != 200 or "[DONE]" not in body or '"error"' in body:
                        self.failures.append(f"{r.status_code} {body[-300:]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.served += 1


async def until(check, timeout_s: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, what
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_a_load_curve_scales_the_pool_up_and_back_down(model_dir: Path) -> None:
    with running_mesh("kvm-autoscale-") as mesh:
        mesh.router = start_router(mesh, "router", yaml=AUTOSCALE)
        template = WorkerConfig(router=mesh.router, engine_kind="fake",
                                fake_token_delay_s=0.02, run_dir=mesh.dir)
        pool = ProcessPool(template, MODEL, mesh.dir, drain_timeout_s=30)
        await pool.grow()
        mesh.start_gateway()
        scaler = Scaler(mesh.router, [pool], interval_s=0.2)
        load = Load(mesh.http)
        tasks = [asyncio.create_task(load.client(i)) for i in range(8)]
        stepping = asyncio.create_task(scaler.run())
        try:
            load.clients = 1
            await asyncio.sleep(3)
            assert pool.size() == 1 and scaler.changes == []
            load.clients = 8  # 8 streams, 2 per worker wanted: up to the maximum, 3
            up_s = await until(lambda: len(pool.procs) == 3, 60, "never scaled to 3")
            assert [c[2] for c in scaler.changes] == ["grow", "grow"]
            await asyncio.sleep(2)
            assert len(pool.procs) == 3  # held at the maximum
            load.clients = 1
            down_s = await until(lambda: pool.size() == 1, 60, "never scaled back to 1")
            for _ in range(100):  # the drained workers left the router
                reply = await scaler.status()
                if len(reply.workers) == 1:
                    break
                await asyncio.sleep(0.1)
            assert len(reply.workers) == 1, reply
            served_at_end = load.served
            await until(lambda: load.served > served_at_end + 3, 10, "traffic stopped")
            print(f"\nautoscale: 1 -> 3 in {up_s:.1f}s, 3 -> 1 in {down_s:.1f}s, "
                  f"{load.served} requests, {len(load.failures)} failed")
            assert [c[2] for c in scaler.changes] == ["grow", "grow", "shrink", "shrink"]
            assert load.failures == []
        finally:
            stepping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(stepping, *tasks, return_exceptions=True)
            await scaler.close()
            await pool.close()


def _workers_running() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "kvmesh.worker" in " ".join(p.cmdline())]


async def test_a_worker_that_does_not_start_in_time_is_stopped(tmp_path: Path) -> None:
    """The pool waits the mesh's ``startup_timeout_s`` for a new worker, then stops it:
    no half-started process is left running unseen by the pool."""
    template = WorkerConfig(router="127.0.0.1:1", engine_kind="fake", run_dir=tmp_path)
    pool = ProcessPool(template, MODEL, tmp_path, startup_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="not ready after"):
        await pool.grow()
    assert time.monotonic() - started < 10
    assert pool.size() == 0 and not pool.procs
    assert not _workers_running()
