"""Overload and backpressure on real processes (fake engines producing as fast as they
can): slow readers cannot make the gateway buffer without bound (a slow reader holds
the worker's generation back), and 500 concurrent streams end in 200s and the
configured 429s only, with the gateway's open fds and RSS back where they were. Each
prints its figures."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from tests.waiting import eventually

from .conftest import running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
MIB = 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_running(endpoint: str) -> int:
    """Generations the (fake) worker has not finished: with backpressure, its streams
    stall mid-way while their readers are slow; without, it would be done long ago."""
    with grpc.insecure_channel(endpoint) as channel:
        reply = vllm_engine_pb2_grpc.VllmEngineStub(channel).GetLoads(
            vllm_engine_pb2.GetLoadsRequest(), timeout=5)
    return sum(load.num_running_reqs for load in reply.loads)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slow_reader(host: str, port: int, body: dict, seconds: float, got: list[int]) -> None:
    """POST a streaming request, then read one byte a second (a tiny receive window, so
    the kernel buffers next to nothing for us either)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1):
                break
            got[0] += 1
            time.sleep(1.0)
    finally:
        sock.close()


def test_slow_readers_do_not_make_the_gateway_buffer(model_dir: Path) -> None:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        worker = mesh.start_worker("w0", token_delay_s=0.0)
        mesh.start_gateway()
        pid = mesh.procs["gateway"].pid
        host, port = mesh.http.removeprefix("http://").removesuffix("/v1").split(":")
        # Each client: a batch of 4 prompts of ~1900 tokens, up to 1900 tokens each
        # (the fake echoes the prompt): ~7600 SSE events, ~2 MB, per client if buffered.
        body = {"model": MODEL, "prompt": ["mesh " * 1900] * 4, "max_tokens": 1900,
                "stream": True}
        clients, seconds = 50, 20.0
        # Warm up with the same set-up at once (tokenizing 200 long prompts, 200 worker
        # calls), one token each: the heap's high-water mark of that set-up is in the
        # baseline, not counted as held (the allocator keeps much of it after a peak).
        with ThreadPoolExecutor(clients) as pool:
            warm = list(pool.map(lambda _: httpx.post(
                mesh.http + "/completions", json={**body, "max_tokens": 1, "stream": False},
                timeout=120).status_code, range(clients)))
        assert warm == [200] * clients
        baseline, cpu0 = rss(pid), cpu_s(pid)
        counters = [[0] for _ in range(clients)]
        threads = [threading.Thread(target=slow_reader, daemon=True,
                                    args=(host, int(port), body, seconds, counters[i]))
                   for i in range(clients)]
        for t in threads:
            t.start()
        peak = baseline
        started = time.monotonic()
        while time.monotonic() - started < seconds - 1:
            peak = max(peak, rss(pid))
            time.sleep(0.5)
        # Still connected, still reading: what the gateway holds for them now (the
        # peak is the requests' set-up, tokenizing 200 long prompts, freed after).
        held = rss(pid) - baseline
        running = worker_running(worker["endpoint"])
        cpu = cpu_s(pid) - cpu0
        for t in threads:
            t.join(10)
        read = sum(c[0] for c in counters)
        print(f"\n{clients} clients reading 1 byte/s for {seconds:.0f} s (batches of 4 "
              f"prompts, up to 7600 events each): gateway RSS {baseline / MIB:.0f} MiB, "
              f"peak +{(peak - baseline) / MIB:.1f} MiB (set-up), +{held / MIB:.1f} MiB held "
              f"after {seconds - 1:.0f} s; gateway CPU {cpu:.1f} s; clients read {read} bytes; "
              f"worker generations still held back: {running} of {clients * 4}")
        assert read >= clients * 10  # they were really reading, slowly
        # What is held is bounded by gRPC's flow-control window per worker stream (200
        # here), not by the output: buffering it (~95 MB of SSE) would blow this.
        assert held < 40 * MIB, f"gateway buffered for slow readers: +{held / MIB:.0f} MiB"


async def _load(base_url: str, streams: int) -> Counter[int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "mesh " * 20}],
            "max_tokens": 16, "stream": True}
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def one() -> int:
            try:
                async with client.stream("POST", "/chat/completions", json=body) as reply:
                    async for _ in reply.aiter_lines():
                        pass
                    return reply.status_code
            except httpx.HTTPError:
                return -1

        return Counter(await asyncio.gather(*(one() for _ in range(streams))))


def test_500_concurrent_streams_no_5xx_and_resources_come_back(model_dir: Path) -> None:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        mesh.start_worker("w0")
        mesh.start_worker("w1")
        mesh.start_gateway("--max-concurrent-requests", "400")
        pid = mesh.procs["gateway"].pid
        asyncio.run(_load(mesh.http, 50))  # warm-up: tokenizer, channels, allocator pools
        time.sleep(1)
        base_fds, base_rss = open_fds(pid), rss(pid)
        rounds = []
        for _ in range(2):
            started = time.monotonic()
            statuses = asyncio.run(_load(mesh.http, 500))
            rounds.append((statuses, time.monotonic() - started))
        # Connections closed, slots released: back to the baseline.
        deadline = time.monotonic() + 15
        while open_fds(pid) > base_fds + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        fds, after = open_fds(pid), rss(pid)
        for statuses, took in rounds:
            print(f"\n500 concurrent streams in {took:.1f} s: statuses {dict(statuses)}")
        print(f"gateway fds {base_fds} -> {fds}, RSS {base_rss / MIB:.0f} -> "
              f"{after / MIB:.0f} MiB")
        for statuses, _ in rounds:
            assert set(statuses) <= {200, 429}, statuses
            assert statuses[200] >= 400
        assert fds <= base_fds + 2
        assert (after - base_rss) / MIB < 30


def test_a_slow_reader_holds_the_worker_back(model_dir: Path) -> None:
    """Past every bounded buffer (the kernel's socket buffer, 4 MiB at most here;
    uvicorn's transport; gRPC's stream window) the worker's stream itself stops: a
    generation of ~8 MB of SSE that a fast reader takes in T seconds is still running on
    the worker after 2T + 5 s when its reader is slow."""
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        worker = mesh.start_worker("w0", "--max-model-len", "200000", token_delay_s=0.0)
        mesh.start_gateway()
        host, port = mesh.http.removeprefix("http://").removesuffix("/v1").split(":")
        body = {"model": MODEL, "prompt": "mesh " * 80000, "max_tokens": 80000,
                "stream": True}
        started = time.monotonic()
        with httpx.stream("POST", mesh.http + "/completions", json=body,
                          timeout=120) as reply:
            fast_bytes = sum(len(chunk) for chunk in reply.iter_bytes())
        fast_s = time.monotonic() - started
        clients, seconds = 3, 2 * fast_s + 5
        counters = [[0] for _ in range(clients)]
        threads = [threading.Thread(target=slow_reader, daemon=True,
                                    args=(host, int(port), body, seconds, counters[i]))
                   for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(seconds - 1)
        running = worker_running(worker["endpoint"])
        for t in threads:
            t.join(10)
        print(f"\na fast reader takes the {fast_bytes / MIB:.1f} MiB stream in {fast_s:.1f} s; "
              f"{clients} readers at 1 byte/s: after {seconds - 1:.0f} s the worker still "
              f"runs {running} of {clients} generations")
        assert fast_bytes > 6 * MIB
        assert running == clients
        assert eventually(lambda: worker_running(worker["endpoint"]), 0, 10) == 0
