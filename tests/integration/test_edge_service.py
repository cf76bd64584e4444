"""The edge deployed on its own: ``python -m kvmesh.edge --router R --envoy`` follows the
gateways registered with a router (a fake-engine mesh on 127.0.0.1) and keeps a real
Envoy in step — a gateway replica added and one removed while HTTP and gRPC requests
flow through Envoy: the new set within 1 s, no restart, no failed request."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.launch.procs import spawn_module, wait_ready_file
from kvmesh.v1 import inference_pb2, inference_pb2_grpc
from tests.router_client import list_workers

from .conftest import Mesh, free_port, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Edge:
    listen: str
    admin: str
    pid: int

    def hosts(self) -> dict[str, dict[str, str]]:
        """Envoy's HTTP gateway cluster as it stands: per host, its stats and flags."""
        text = httpx.get(f"http://{self.admin}/clusters", timeout=5).text
        out: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if parts[0] == "kvmesh_gateways_http" and len(parts) == 4 and ":" in parts[1]:
                out.setdefault(parts[1], {})[parts[2]] = parts[3]
        return out

    def until_hosts(self, wanted: set[str], since: float, within_s: float) -> float:
        """Seconds from ``since`` (wall clock) until Envoy's set is ``wanted``."""
        while set(self.hosts()) != wanted:
            assert time.time() - since < within_s + 5, self.hosts()
            time.sleep(0.01)
        return time.time() - since


@pytest.fixture(scope="module")
def edge_mesh(model_dir: Path) -> Iterator[tuple[Mesh, Edge]]:
    with running_mesh("kvm-edge-svc-") as mesh:
        mesh.router = start_router(mesh)
        mesh.workers = [mesh.start_worker("w0")]
        mesh.start_gateway(name="g1")
        ready = mesh.dir / "edge.ready"
        listen = f"127.0.0.1:{free_port()}"
        proc = spawn_module("kvmesh.edge", [
            "--router", mesh.router, "--envoy", "--port", "0", "--admin-port", "0",
            "--listen", listen, "--run-dir", str(mesh.dir / "envoy"),
            "--ready-file", str(ready)], mesh.dir / "edge.log")
        mesh.procs["edge"] = proc
        info = wait_ready_file(ready, 60, proc, "kvmesh.edge")
        yield mesh, Edge(listen, info["admin"], info["envoy_pid"])


def http_address(gateway: dict) -> str:
    return str(gateway["http"]).removeprefix("http://").removesuffix("/v1")


@dataclass
class Traffic:
    """HTTP and gRPC chat requests through Envoy, back to back, until stopped."""

    listen: str
    failures: list[str] = field(default_factory=list)
    served: int = 0
    _done: threading.Event = field(default_factory=threading.Event)

    def http(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._done.is_set():
                reply = client.post(f"http://{self.listen}/v1/chat/completions", json={
                    "model": MODEL, "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hi"}]})
                self._count(reply.status_code == 200,
                            f"{time.time():.3f} HTTP {reply.status_code} {reply.text}")

    def grpc(self) -> None:
        with grpc.insecure_channel(self.listen) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not self._done.is_set():
                try:
                    for _ in stub.Chat(inference_pb2.ChatRequest(
                            model=MODEL, messages=[inference_pb2.ChatMessage(
                                role="user", content="hi")],
                            sampling=inference_pb2.SamplingOptions(max_tokens=3)), timeout=30):
                        pass
                    self._count(True, "")
                except grpc.RpcError as exc:
                    self._count(False, f"{time.time():.3f} gRPC {exc.code()} {exc.details()}")

    def _count(self, ok: bool, failure: str) -> None:
        self.served += 1
        if not ok:
            self.failures.append(failure)

    def served_more(self, n: int, timeout_s: float = 30) -> None:
        target = self.served + n
        deadline = time.monotonic() + timeout_s
        while self.served < target:
            assert time.monotonic() < deadline, "traffic stalled"
            time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._threads = [threading.Thread(target=self.http), threading.Thread(target=self.grpc)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(60)


def test_gateways_registered_with_the_router_are_envoys_endpoints_live(
        edge_mesh: tuple[Mesh, Edge]) -> None:
    mesh, edge = edge_mesh
    g1 = http_address(wait_ready_file(mesh.dir / "g1.ready", 5))
    assert set(edge.hosts()) == {g1}
    # A registered gateway is an endpoint of the edge, never a worker of the router.
    assert [w.worker.worker_id for w in list_workers(mesh.router)] == ["w0"]
    with Traffic(edge.listen) as traffic:
        traffic.served_more(5)
        g2 = http_address(mesh.start_gateway(name="g2"))  # returns once it is healthy
        registered_at = time.time()  # it registers as it becomes healthy
        added_s = edge.until_hosts({g1, g2}, registered_at, 1.0)
        while int(edge.hosts()[g2].get("rq_total", "0")) == 0:  # and routes to it
            assert time.time() - registered_at < 1.0 + 5, edge.hosts()
            time.sleep(0.01)
        routed_s = time.time() - registered_at
        stopping_at = time.time()
        mesh.procs["g1"].send_signal(signal.SIGTERM)  # deregisters, drains, stops
        removed_s = edge.until_hosts({g2}, stopping_at, 1.0)
        traffic.served_more(10)
        assert mesh.procs["g1"].wait(30) == 0
        traffic.served_more(10)  # with the first gateway gone
    print(f"standalone edge: gateway in Envoy's set {added_s * 1000:.0f} ms after it "
          f"was healthy, first request on it at {routed_s * 1000:.0f} ms; removed "
          f"{removed_s * 1000:.0f} ms after SIGTERM; {traffic.served} requests, "
          f"{len(traffic.failures)} failed")
    log = (mesh.dir / "envoy" / "envoy.log").read_text().splitlines()
    assert traffic.failures == [], (registered_at, stopping_at, [
        line for line in log if " 200 " not in line])
    assert added_s < 1.0 and routed_s < 1.0 and removed_s < 1.0
    assert os.path.exists(f"/proc/{edge.pid}")  # the same Envoy throughout: no restart
