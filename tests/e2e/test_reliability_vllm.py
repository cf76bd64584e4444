"""Overload and drain on real CPU vLLM: router, two vLLM workers (`--no-ray`, one core
each) and a gateway as processes. 32 concurrent streams end in 200s and the configured
429s only, with the gateway's and workers' open fds and the gateway's RSS back where
they were; then a worker drains on SIGTERM with streams in flight (NOT_SERVING first,
out of routing, streams finish, deregistered, exit 0). Both print their figures."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from kvmesh.v1 import router_pb2, router_pb2_grpc

from .conftest import ENGINE_FLAGS, MODEL

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024
MAX_CONCURRENT = 24  # the gateway's limit: of 32 streams, the rest get 429
ENGINE_NICE = 7


@dataclass
class RealMesh:
    dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)

    def spawn(self, name: str, module: str, *args: str, timeout_s: float = 60,
              env: dict[str, str] | None = None) -> dict:
        ready = self.dir / f"{name}.ready"
        proc = spawn_module(module, [*args, "--ready-file", str(ready)],
                            self.dir / f"{name}.log", env=env)
        self.procs[name] = proc
        self.info[name] = wait_ready_file(ready, timeout_s, proc, name)
        return self.info[name]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.dir.glob("*.log")))


@pytest.fixture(scope="module")
def mesh(model_dir: Path) -> Iterator[RealMesh]:
    with tempfile.TemporaryDirectory(prefix="kvm-rel-") as d:
        m = RealMesh(Path(d))
        try:
            config = m.dir / "router.yaml"
            config.write_text("heartbeat_interval_s: 0.5\nlease_ttl_s: 5\nmetrics_port: 0\n")
            router = m.spawn("router", "kvmesh.router", "--config", str(config), "--port", "0")
            for i in range(2):
                # w1's engine runs nicer (engine_nice, from the environment as any
                # setting): test_engine_nice_reaches_every_engine_thread.
                env = {**os.environ, "KVMESH_WORKER_ENGINE_NICE": str(ENGINE_NICE * i)}
                m.spawn(f"w{i}", "kvmesh.worker", "--no-ray", "--model", str(model_dir),
                        "--worker-id", f"w{i}", "--router", router["grpc"], "--port", "0",
                        "--cpu-bind", str(i), "--run-dir", str(m.dir), *ENGINE_FLAGS,
                        timeout_s=600, env=env)
            gateway_config = m.dir / "gateway.yaml"
            gateway_config.write_text("register_with_router: false\n")
            m.spawn("gateway", "kvmesh.gateway", "--config", str(gateway_config),
                    "--router", router["grpc"], "--port", "0", "--grpc-port", "0",
                    "--max-concurrent-requests", str(MAX_CONCURRENT), timeout_s=120)
            base = m.info["gateway"]["http"].removesuffix("/v1")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            yield m
        except BaseException:
            print(m.logs())
            raise
        finally:
            for proc in m.procs.values():
                terminate(proc, 60)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _streams(base_url: str, n: int, max_tokens: int) -> list[tuple[int, str | None]]:
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me about the sea."}]}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def one() -> tuple[int, str | None]:
            finish = None
            try:
                async with client.stream("POST", "/chat/completions", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if '"finish_reason":"' in line.replace(" ", ""):
                            finish = line.split('"finish_reason":')[1].split('"')[1]
                    return reply.status_code, finish
            except httpx.HTTPError as exc:
                return -1, repr(exc)

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_32_streams_on_real_vllm_no_5xx_and_resources_come_back(mesh: RealMesh) -> None:
    base_url = mesh.info["gateway"]["http"]
    pids = {name: mesh.procs[name].pid for name in ("gateway", "w0", "w1")}
    asyncio.run(_streams(base_url, 8, 8))  # warm-up
    time.sleep(1)
    before = {name: (fds(pid), rss(pid)) for name, pid in pids.items()}
    started = time.monotonic()
    results = asyncio.run(_streams(base_url, 32, 32))
    took = time.monotonic() - started
    statuses = Counter(status for status, _ in results)
    deadline = time.monotonic() + 15
    while any(fds(pid) > before[n][0] + 2 for n, pid in pids.items()) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    after = {name: (fds(pid), rss(pid)) for name, pid in pids.items()}
    print(f"\n32 concurrent streams on real vLLM (2 workers, gateway limit {MAX_CONCURRENT}) "
          f"in {took:.1f} s: statuses {dict(statuses)}")
    for name in pids:
        print(f"  {name}: fds {before[name][0]} -> {after[name][0]}, RSS "
              f"{before[name][1] / MIB:.0f} -> {after[name][1] / MIB:.0f} MiB")
    assert set(statuses) <= {200, 429}, results
    assert statuses[200] >= MAX_CONCURRENT
    assert all(finish == "length" for status, finish in results if status == 200)
    for name in pids:
        assert after[name][0] <= before[name][0] + 2, name
    assert (after["gateway"][1] - before["gateway"][1]) / MIB < 30
    # Real vLLM's numbered KV events under load read as in order: no false gap, no reset.
    metrics = httpx.get(f"http://{mesh.info['router']['metrics']}/metrics", timeout=5).text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
               if line.startswith(("kvmesh_router_kv_event_blocks_total",
                                   "kvmesh_router_kv_event_gaps_total",
                                   "kvmesh_router_kv_event_resets_total",
                                   "kvmesh_router_kv_event_lag_seconds_count"))}
    print(f"  router KV events: {samples}")
    assert samples['kvmesh_router_kv_event_blocks_total{kind="stored"}'] > 0
    assert samples["kvmesh_router_kv_event_gaps_total"] == 0
    assert samples["kvmesh_router_kv_event_resets_total"] == 0


def _nices(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, t.id) for t in psutil.Process(pid).threads()}


def test_engine_nice_reaches_every_engine_thread(mesh: RealMesh) -> None:
    """`engine_nice` makes every thread of vLLM's engine core (its OpenMP pool
    included) nicer, and leaves the worker's own process — the gRPC front — as it was."""
    engines = {name: [p for p in psutil.Process(mesh.procs[name].pid).children(recursive=True)
                      if "EngineCor" in p.name()] for name in ("w0", "w1")}
    assert all(len(cores) == 1 for cores in engines.values()), engines
    assert len(engines["w1"][0].threads()) > 2
    assert _nices(engines["w1"][0].pid) == {ENGINE_NICE}
    assert _nices(engines["w0"][0].pid) == {0}
    assert _nices(mesh.procs["w1"].pid) == {0}
    assert f"at niceness +{ENGINE_NICE} (engine_nice)" in (mesh.dir / "w1.log").read_text()


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[no-any-return, attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_real_vllm_worker_drains_on_sigterm(mesh: RealMesh) -> None:
    base_url = mesh.info["gateway"]["http"]
    router = router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh.info["router"]["grpc"]))
    w0 = mesh.info["w0"]["endpoint"]

    def listed() -> dict[str, tuple[bool, int]]:
        workers = router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers
        return {w.worker.worker_id: (w.worker.draining, w.load.in_flight) for w in workers}

    # What earlier tests routed has finished and been reported (no in-flight leak): the
    # count below is this test's streams alone.
    deadline = time.monotonic() + 30
    while any(n for _, n in listed().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(n for _, n in listed().values()), listed()
    loop = asyncio.new_event_loop()
    try:
        # 6 streams of 400 tokens (EOS ignored), many seconds each, spread over both
        # workers. SIGTERM goes to w0 once the router counts all 6 in flight, so the
        # drain always has streams to wait for, however fast the host.
        task = loop.create_task(_streams(base_url, 6, 400))
        deadline = time.monotonic() + 60
        while sum(n for _, n in listed().values()) < 6 and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.05))
        at_sigterm = listed()
        assert at_sigterm["w0"][1] >= 1 and not task.done(), at_sigterm
        sent = time.monotonic()
        mesh.procs["w0"].send_signal(signal.SIGTERM)
        to_not_serving = None
        while to_not_serving is None and time.monotonic() - sent < 5:
            if _health(w0) == "NOT_SERVING":
                to_not_serving = time.monotonic() - sent
        assert to_not_serving is not None
        # Out of routing but still listed: its streams are in flight (the router's count).
        during = listed()
        assert during["w0"][0] is True and during["w0"][1] >= 1, during
        assert during["w1"][0] is False, during
        picks = set()
        for i in range(4):
            decision = router.Route(router_pb2.RouteRequest(
                request_id=f"probe-{i}", model=MODEL, token_ids=[1, 2, 3]), timeout=5)
            picks.add(decision.worker.worker_id)
            router.RequestFinished(router_pb2.RequestFinishedRequest(
                request_id=f"probe-{i}", worker_id=decision.worker.worker_id), timeout=5)
        results = loop.run_until_complete(asyncio.wait_for(task, 180))
        code = mesh.procs["w0"].wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        loop.close()
    print(f"\nreal vLLM worker drain: NOT_SERVING after {to_not_serving:.2f} s with "
          f"{during['w0'][1]} of w0's streams in flight, exit {code} after {took:.1f} s; "
          f"streams {results}")
    assert picks == {"w1"}
    assert results == [(200, "length")] * 6
    assert code == 0
    assert list(listed()) == ["w1"]
