"""The router as the edge's endpoint picker: a real Envoy whose ext_proc filter asks the
gateways' endpoint picker (Gateway API Inference Extension protocol) where each
generation goes, and sends it straight there through an original-destination cluster.

Two fake-engine workers, two gateways serving the picker, the kv_aware router, and
``python -m kvmesh.edge --router R --envoy --picker``: requests sharing a prefix land on
one worker and one gateway (Envoy's access log names both), the picker's worker is the
router's own kv_aware decision for those tokens, and the gateway books the request on
exactly that worker.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from kvmesh.launch.procs import spawn_module, wait_ready_file
from kvmesh.v1 import router_pb2, router_pb2_grpc
from tests.router_client import list_workers

from .conftest import Mesh, free_port, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
LINE = re.compile(r'"POST (\S+) .*x-request-id=(\S+) upstream=(\S+) picked=(\S+)')


def prompt(prefix: int, suffix: int) -> list[int]:
    """A token-id prompt: 256 tokens shared by one prefix family, then its own 8."""
    rng = np.random.default_rng(prefix)
    return [int(t) for t in rng.integers(100, 40000, 256)] + [1000 + suffix] * 8


@pytest.fixture(scope="module")
def picker_mesh(model_dir: Path) -> Iterator[tuple[Mesh, str, Path]]:
    with running_mesh("kvm-picker-") as mesh:
        mesh.router = start_router(mesh, "router", "--policy", "kv_aware")
        mesh.workers = [mesh.start_worker("w0"), mesh.start_worker("w1")]
        gateways = [mesh.start_gateway("--endpoint-picker", name=f"g{i}") for i in range(2)]
        ready = mesh.dir / "edge.ready"
        listen = f"127.0.0.1:{free_port()}"
        proc = spawn_module("kvmesh.edge", [
            "--router", mesh.router, "--envoy", "--picker", "--port", "0",
            "--admin-port", "0", "--listen", listen, "--run-dir", str(mesh.dir / "envoy"),
            "--ready-file", str(ready)], mesh.dir / "edge.log")
        mesh.procs["edge"] = proc
        info = wait_ready_file(ready, 60, proc, "kvmesh.edge")
        wanted = {str(g["http"]).removeprefix("http://").removesuffix("/v1") for g in gateways}
        deadline = time.monotonic() + 30
        while True:  # both gateways registered, in Envoy and healthy
            text = httpx.get(f"http://{info['admin']}/clusters", timeout=5).text
            healthy = {line.split("::")[1] for line in text.splitlines()
                       if line.startswith("kvmesh_gateways_http::")
                       and line.endswith("health_flags::healthy")}
            if healthy >= wanted:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        yield mesh, listen, Path(info["envoy_log"])


def access_log(path: Path, request_ids: set[str]) -> dict[str, tuple[str, str, str]]:
    """Envoy's access-log lines of these requests: id → (path, upstream gateway,
    worker the picker chose)."""
    deadline = time.monotonic() + 10
    while True:  # Envoy flushes its access log on its own schedule
        found = {m[2]: (m[1], m[3], m[4]) for m in LINE.finditer(path.read_text())
                 if m[2] in request_ids}
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def preview(router: str, token_ids: list[int]) -> str:
    """The router's kv_aware decision for these tokens now (nothing booked)."""
    async def run() -> str:
        async with grpc.aio.insecure_channel(router) as channel:
            decision = await router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(
                request_id="check", model=MODEL, token_ids=token_ids, max_tokens=4,
                preview=True), timeout=5)
            return str(decision.worker.worker_id)

    return asyncio.run(run())


def test_requests_sharing_a_prefix_land_on_the_backend_the_router_picks(
        picker_mesh: tuple[Mesh, str, Path]) -> None:
    mesh, listen, envoy_log = picker_mesh
    sent: dict[str, int] = {}
    with httpx.Client(base_url=f"http://{listen}", timeout=30) as client:
        for round_ in range(4):
            for family in (1, 2, 3):
                rid = f"pick-{family}-{round_}"
                reply = client.post("/v1/completions", headers={"x-request-id": rid}, json={
                    "model": MODEL, "prompt": prompt(family, round_), "max_tokens": 4})
                assert reply.status_code == 200, reply.text
                sent[rid] = family
        chat = client.post("/v1/chat/completions", headers={"x-request-id": "pick-chat"}, json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
    lines = access_log(envoy_log, set(sent) | {"pick-chat"})
    assert set(lines) == set(sent) | {"pick-chat"}, envoy_log.read_text()[-3000:]
    workers = {w["worker_id"] for w in mesh.workers}
    assert lines["pick-chat"][2] in workers  # chat is picked too

    by_family: dict[int, set[tuple[str, str]]] = defaultdict(set)
    for rid, family in sent.items():
        _, upstream, worker = lines[rid]
        assert worker in workers, lines[rid]
        by_family[family].add((upstream, worker))
    # One backend (gateway and worker) per prefix family, after the first request.
    assert all(len(backends) == 1 for backends in by_family.values()), by_family
    # The families did not all pile onto one worker: kv_aware balances new prefixes.
    assert len({w for backends in by_family.values() for _, w in backends}) == 2, by_family
    # One worker is always fronted by the same gateway.
    fronts = {w: u for backends in by_family.values() for u, w in backends}
    assert len(fronts) == len({(u, w) for b in by_family.values() for u, w in b})
    # The picker's worker is the router's own kv_aware decision for those tokens.
    for family, backends in by_family.items():
        ((_, worker),) = backends
        assert preview(mesh.router, prompt(family, 99)) == worker


def test_the_gateway_books_the_request_on_the_picked_worker(
        picker_mesh: tuple[Mesh, str, Path]) -> None:
    mesh, listen, envoy_log = picker_mesh
    token_ids = prompt(7, 0)
    done = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"http://{listen}/v1/completions", timeout=30,
                          headers={"x-request-id": "pick-long"},
                          json={"model": MODEL, "prompt": token_ids, "max_tokens": 150,
                                "stream": True}) as reply:
            assert reply.status_code == 200
            for _ in reply.iter_lines():
                pass
        done.set()

    thread = threading.Thread(target=stream)
    thread.start()
    busy: set[str] = set()
    deadline = time.monotonic() + 10
    while not busy and time.monotonic() < deadline:
        busy = {w.worker.worker_id for w in list_workers(mesh.router) if w.load.in_flight}
        time.sleep(0.05)
    thread.join(30)
    assert done.is_set()
    (_, _, picked), = access_log(envoy_log, {"pick-long"}).values()
    assert busy == {picked}
