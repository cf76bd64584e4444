"""Graceful drain on SIGTERM, with streams in flight, on every service (real processes,
fake engines): health turns NOT_SERVING first, new work goes elsewhere, the streams in
flight finish, the process exits 0 (a worker deregistered, a gateway out of the
router's gateway set). Each test prints how long the drain took."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.v1 import inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
# The fake engine echoes the prompt at 20 ms a token: 150 tokens stream for ~3 s.
PROMPT = "mesh " * 400
TOKENS = 150


@dataclass
class Stream:
    """One streamed completion read in a thread: its text chunks, how it ended."""

    base_url: str
    max_tokens: int = TOKENS
    chunks: int = 0
    finish: str | None = None
    error: str | None = None
    status: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Stream:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": self.max_tokens,
                "stream": True}
        try:
            with httpx.stream("POST", self.base_url + "/completions", json=body,
                              timeout=60) as reply:
                self.status = reply.status_code
                for line in reply.iter_lines():
                    if line.startswith("data: {"):
                        self.chunks += 1
                        if '"error"' in line:
                            self.error = line
                        elif '"finish_reason":"' in line.replace(" ", ""):
                            self.finish = line.split('"finish_reason":')[1].split('"')[1]
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        finally:
            self.done.set()


@dataclass
class GrpcStream:
    """The same over the gateway's Inference gRPC door."""

    target: str
    chunks: int = 0
    finish: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> GrpcStream:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(self.target) as channel:
                for reply in inference_pb2_grpc.InferenceStub(channel).Complete(
                        inference_pb2.CompletionRequest(
                            model=MODEL, text=PROMPT, stream=True,
                            sampling=inference_pb2.SamplingOptions(max_tokens=TOKENS)),
                        timeout=60):
                    self.chunks += 1
                    self.finish = next((c.finish_reason for c in reply.choices
                                        if c.finish_reason), self.finish)
        except grpc.RpcError as exc:
            self.error = repr(exc)
        finally:
            self.done.set()


def health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[no-any-return, attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for(read: Callable[[], object], timeout_s: float) -> float:
    started = time.monotonic()
    while not read():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - started


def router_stub(mesh: Mesh) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh.router))


def streaming(streams: list[Stream]) -> bool:
    return all(s.chunks >= 3 for s in streams)


def test_worker_drains_streams_goes_out_of_routing_and_deregisters(model_dir: Path) -> None:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        w0, w1 = mesh.start_worker("w0"), mesh.start_worker("w1")
        mesh.start_gateway()
        streams = [Stream(mesh.http).start() for _ in range(4)]  # round robin: 2 each
        wait_for(lambda: streaming(streams), 30)
        router = router_stub(mesh)
        sent = time.monotonic()
        mesh.procs["w0"].send_signal(signal.SIGTERM)
        to_not_serving = wait_for(lambda: health(w0["endpoint"]) == "NOT_SERVING", 5)
        assert not all(s.done.is_set() for s in streams), "drained before streams ended"

        def draining() -> bool:
            listed = router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2).workers
            return any(w.worker.worker_id == "w0" and w.worker.draining for w in listed)

        wait_for(draining, 5)
        watch = router.WatchWorkers(router_pb2.WatchWorkersRequest(), timeout=5)
        watched = next(iter(watch))
        watch.cancel()
        assert {w.worker_id: w.draining for w in watched.workers} == {"w0": True, "w1": False}
        # New work goes elsewhere: every Route now picks w1.
        picks = set()
        for i in range(6):
            decision = router.Route(router_pb2.RouteRequest(
                request_id=f"probe-{i}", model=MODEL, token_ids=[1, 2, 3]), timeout=5)
            picks.add(decision.worker.worker_id)
            router.RequestFinished(router_pb2.RequestFinishedRequest(
                request_id=f"probe-{i}", worker_id=decision.worker.worker_id), timeout=5)
        assert picks == {"w1"}
        code = mesh.procs["w0"].wait(timeout=40)
        drained = time.monotonic() - sent
        for s in streams:
            assert s.done.wait(30)
        print(f"\nworker drain: NOT_SERVING after {to_not_serving:.2f} s, exit {code} after "
              f"{drained:.2f} s; streams finished {[s.finish for s in streams]}")
        assert code == 0
        assert all(s.finish == "length" and s.error is None for s in streams)
        listed = router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2).workers
        assert [w.worker.worker_id for w in listed] == ["w1"]  # deregistered, not expired
        assert w1["endpoint"] and health(w1["endpoint"]) == "SERVING"


def test_worker_drain_deadline_is_configurable(model_dir: Path) -> None:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        config = mesh.dir / "w0.yaml"
        config.write_text("drain_timeout_s: 1\n")
        mesh.start_worker("w0", "--config", str(config))
        mesh.start_gateway()
        long = Stream(mesh.http, max_tokens=390).start()  # ~8 s of tokens
        wait_for(lambda: long.chunks >= 3, 30)
        sent = time.monotonic()
        mesh.procs["w0"].send_signal(signal.SIGTERM)
        code = mesh.procs["w0"].wait(timeout=20)
        took = time.monotonic() - sent
        print(f"\nworker drain with drain_timeout_s=1: exit {code} after {took:.2f} s")
        assert code == 0 and took < 4
        assert long.done.wait(10) and long.finish != "length"


def test_gateway_drains_streams_and_leaves_the_gateway_set(model_dir: Path) -> None:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        mesh.start_worker("w0")
        mesh.start_worker("w1")
        a = mesh.start_gateway(name="gw-a")
        b = mesh.start_gateway(name="gw-b")
        router = router_stub(mesh)

        def gateways() -> set[str]:
            watch = router.WatchWorkers(router_pb2.WatchWorkersRequest(), timeout=2)
            first = next(iter(watch))
            watch.cancel()
            return {g.endpoint for g in first.gateways}

        wait_for(lambda: gateways() == {a["grpc"], b["grpc"]}, 10)
        streams = [Stream(a["http"]).start() for _ in range(3)]
        over_grpc = GrpcStream(a["grpc"]).start()
        wait_for(lambda: streaming(streams) and over_grpc.chunks >= 3, 30)
        sent = time.monotonic()
        mesh.procs["gw-a"].send_signal(signal.SIGTERM)
        to_not_serving = wait_for(lambda: health(a["grpc"]) == "NOT_SERVING", 5)
        ready = httpx.get(a["http"].removesuffix("/v1") + "/health", timeout=2)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert not all(s.done.is_set() for s in streams)
        wait_for(lambda: gateways() == {b["grpc"]}, 5)
        # The other replica takes the new work meanwhile.
        other = Stream(b["http"], max_tokens=10).start()
        code = mesh.procs["gw-a"].wait(timeout=40)
        drained = time.monotonic() - sent
        print(f"\ngateway drain: NOT_SERVING after {to_not_serving:.2f} s, exit {code} after "
              f"{drained:.2f} s; streams finished {[s.finish for s in streams]} (HTTP), "
              f"{over_grpc.finish} (gRPC)")
        assert code == 0
        assert all(s.done.wait(5) and s.finish == "length" and s.error is None
                   for s in streams)
        assert over_grpc.done.wait(5) and over_grpc.finish == "length", over_grpc.error
        assert other.done.wait(30) and other.finish == "length"


def test_router_drains_held_routes_before_exiting(model_dir: Path) -> None:
    with running_mesh() as mesh:
        # One slot per worker: a second request waits at the router for the first.
        mesh.router = start_router(mesh, "router", "--max-inflight-per-worker", "1")
        mesh.start_worker("w0")
        mesh.start_gateway()
        first = Stream(mesh.http).start()
        wait_for(lambda: first.chunks >= 3, 30)
        held = Stream(mesh.http, max_tokens=20).start()
        time.sleep(0.5)  # its Route call is now held at the router
        assert held.chunks == 0
        sent = time.monotonic()
        mesh.procs["router"].send_signal(signal.SIGTERM)
        to_not_serving = wait_for(lambda: health(mesh.router) == "NOT_SERVING", 5)
        code = mesh.procs["router"].wait(timeout=40)
        drained = time.monotonic() - sent
        print(f"\nrouter drain: NOT_SERVING after {to_not_serving:.2f} s, exit {code} after "
              f"{drained:.2f} s")
        assert code == 0
        assert first.done.wait(10) and first.finish == "length" and first.error is None
        assert held.done.wait(10) and held.finish == "length" and held.error is None
