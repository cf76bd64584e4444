"""A worker's load arrives pushed on its KV-event stream, so the router stops polling
it with GetLoads; a worker whose stream is lost is probed at once. Real router and
fake-worker processes (the fake engine's stream carries load records as a kvmesh
worker's does before its first batch)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.failover_streams import seconds_until_unreachable

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration


def polls(mesh: Mesh) -> dict[str, float]:
    text = httpx.get(f"http://{mesh.router_metrics}/metrics", timeout=5).text
    prefix = 'kvmesh_router_load_polls_total{outcome="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


def test_a_pushing_worker_is_not_polled_and_a_lost_one_is_probed_at_once() -> None:
    with running_mesh() as mesh:
        # Polls every 0.2 s (the quick default here), lease 3 s.
        mesh.router = start_router(mesh)
        mesh.start_worker("w0")
        deadline = time.monotonic() + 10
        while polls(mesh).get("skipped", 0) < 3:  # its stream pushed: polls skipped
            assert time.monotonic() < deadline, polls(mesh)
            time.sleep(0.1)
        before = polls(mesh)
        time.sleep(2.0)  # ten intervals
        after = polls(mesh)
        answered = after.get("answered", 0) - before.get("answered", 0)
        skipped = after["skipped"] - before["skipped"]
        print(f"\nin 2 s: {answered:.0f} polls answered, {skipped:.0f} skipped")
        assert answered <= 1 and skipped >= 7
        mesh.procs["w0"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        mesh.procs["w0"].wait(timeout=5)
        # Its stream breaks (UNAVAILABLE): probed at once, out of routing well before
        # the 3 s lease would expire.
        waited = asyncio.run(seconds_until_unreachable(mesh.router, "w0", killed, 3.0))
        print(f"out of routing {waited:.2f} s after SIGKILL")
        assert waited < 1.5
