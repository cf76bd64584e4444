"""The load generator of ``kvmesh bench router --rpc``: Route calls to a router from a
process of its own (``python -m kvmesh.bench.route_load``), closed loop or at a fixed
rate, each followed by its RequestFinished as a gateway sends it.

Requests are serialised once (the prompts are fixed; each call only prepends its own
request id, a protobuf field concatenation), so this process spends its core on the
calls rather than on building 8k-token messages, and the router gets exactly what a
gateway sends (packed token ids).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from kvmesh.bench.stats import percentile
from kvmesh.core.grpc_util import internal_channel
from kvmesh.core.malloc_tuning import tune_malloc
from kvmesh.core.route_batch import RouteBatcher
from kvmesh.core.route_stream import RouteStreamSender, stub_batcher
from kvmesh.core.service_main import freeze_heap
from kvmesh.v1 import router_pb2, router_pb2_grpc

#: How requests reach the router.
TRANSPORTS = {
    "route": "Route per request",
    "batch": "RouteBatch calls (the gateway's RouteBatcher)",
    "stream": "RouteBatch on a RouteStream (the gateway's default)",
}
ROUTE = "/kvmesh.v1.Router/Route"
FINISHED = "/kvmesh.v1.Router/RequestFinished"


def request_bodies(prompts: np.ndarray, model: str, max_tokens: int) -> list[bytes]:
    """One serialised RouteRequest per prompt row, without its request id."""
    return [router_pb2.RouteRequest(model=model, packed_token_ids=row.astype("<u4").tobytes(),
                                    max_tokens=max_tokens).SerializeToString()
            for row in prompts]


def with_id(body: bytes, request_id: str) -> bytes:
    """``body`` with its request id set (a later field merges into the message)."""
    return router_pb2.RouteRequest(request_id=request_id).SerializeToString() + body


class Caller:
    """Route (+ RequestFinished) over a few channels, raw bytes in and out; or, with
    through the gateway's RouteBatcher on one channel: ``transport`` (TRANSPORTS)."""

    def __init__(self, target: str, channels: int, finish: bool,
                 transport: str = "route") -> None:
        # The gateway's own channel (its options: a fixed flow-control window, no BDP
        # probing), so the router sees the connections a gateway opens.
        self._channels = [internal_channel(target) for _ in range(channels)]
        self._route = [c.unary_unary(ROUTE) for c in self._channels]
        self._finished = [c.unary_unary(FINISHED) for c in self._channels]
        self._finish = finish
        self.batcher: RouteBatcher | None = None
        self.stream: RouteStreamSender | None = None
        if transport in ("batch", "stream"):
            self.batcher, self.stream = stub_batcher(
                router_pb2_grpc.RouterStub(self._channels[0]), 10.0,
                stream=transport == "stream")
        self.latencies: list[float] = []
        self.errors = 0
        #: Failures by status code and message (the first of each).
        self.error_kinds: dict[str, str] = {}
        self.workers: dict[str, int] = {}

    async def call(self, i: int, body: bytes) -> None:
        if self.batcher is not None:
            await self._batched(i, body)
            return
        k = i % len(self._route)
        rid = f"b{i}"
        started = time.perf_counter()
        try:
            raw = await self._route[k](with_id(body, rid), timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)
            return
        self.latencies.append(time.perf_counter() - started)
        decision = router_pb2.RouteDecision.FromString(raw)
        worker = decision.worker.worker_id
        self.workers[worker] = self.workers.get(worker, 0) + 1
        if self._finish:
            finished = router_pb2.RequestFinishedRequest(request_id=rid, worker_id=worker)
            try:
                await self._finished[k](finished.SerializeToString(), timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                self._failed(exc)

    async def _batched(self, i: int, body: bytes) -> None:
        assert self.batcher is not None
        rid = f"b{i}"
        started = time.perf_counter()
        try:
            # As the gateway builds it: a message per request around the packed prompt.
            decision = await self.batcher.route(router_pb2.RouteRequest.FromString(
                with_id(body, rid)))
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)
            return
        self.latencies.append(time.perf_counter() - started)
        worker = decision.worker.worker_id
        self.workers[worker] = self.workers.get(worker, 0) + 1
        if self._finish:
            self.batcher.finished(rid, worker)

    def _failed(self, exc: grpc.aio.AioRpcError) -> None:
        self.errors += 1
        self.error_kinds.setdefault(exc.code().name, str(exc.details()))

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()
        for channel in self._channels:
            await channel.close()


async def closed_loop(caller: Caller, bodies: list[bytes], concurrency: int,
                      duration_s: float) -> float:
    """``concurrency`` callers back to back for ``duration_s``; returns seconds taken."""
    stop = time.perf_counter() + duration_s
    counter = iter(range(1 << 62))

    async def one() -> None:
        while time.perf_counter() < stop:
            i = next(counter)
            await caller.call(i, bodies[i % len(bodies)])

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return time.perf_counter() - started


async def open_loop(caller: Caller, bodies: list[bytes], rate: float,
                    duration_s: float) -> float:
    """Calls started at ``rate`` per second (whatever the answers' pace) for
    ``duration_s``; returns seconds until the last one answered."""
    total = int(rate * duration_s)
    started = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            task = asyncio.create_task(caller.call(sent, bodies[sent % len(bodies)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


def summary(caller: Caller, elapsed_s: float) -> dict[str, Any]:
    lat = caller.latencies
    return {
        "decisions": len(lat),
        "decisions_per_s": round(len(lat) / elapsed_s, 1),
        "p50_ms": round(percentile(lat, 0.5) * 1e3, 3) if lat else None,
        "p99_ms": round(percentile(lat, 0.99) * 1e3, 3) if lat else None,
        "errors": caller.errors,
        **({"error_kinds": caller.error_kinds} if caller.errors else {}),
        "workers_chosen": len(caller.workers),
        **({"batches": caller.batcher.batches,
            "mean_batch": round(caller.batcher.routed / max(caller.batcher.batches, 1), 1)}
           if caller.batcher is not None else {}),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tune_malloc()  # the allocator a gateway's RouteBatcher runs with
    prompts = np.load(args.prompts)
    bodies = request_bodies(prompts, args.model, args.max_tokens)
    # As a gateway does once started: a full collection would walk the start-up heap
    # here too, and its pause would count as the router's latency.
    freeze_heap()
    if args.warmup_s > 0:
        warm = Caller(args.target, args.channels, args.finish, args.transport)
        await closed_loop(warm, bodies, args.concurrency, args.warmup_s)
        await warm.close()
    caller = Caller(args.target, args.channels, args.finish, args.transport)
    cpu = time.process_time()
    if args.rate > 0:
        elapsed = await open_loop(caller, bodies, args.rate, args.duration_s)
    else:
        elapsed = await closed_loop(caller, bodies, args.concurrency, args.duration_s)
    cpu = time.process_time() - cpu
    await caller.close()
    mode = (f"open loop at {args.rate:g}/s" if args.rate > 0
            else f"closed loop, {args.concurrency} concurrent")
    return {"mode": f"{mode}, {TRANSPORTS[args.transport]}", "transport": args.transport,
            **summary(caller, elapsed),
            # This process's own share of a core: near 1, its queueing is in the latency.
            "load_busy": round(cpu / elapsed, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Route load against a router")
    parser.add_argument("--target", required=True, help="router host:port")
    parser.add_argument("--prompts", type=Path, required=True, help=".npy of uint32 rows")
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop at this rate")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--no-finish", dest="finish", action="store_false",
                        help="skip RequestFinished after each Route")
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="route",
                        help="; ".join(f"{k}: {v}" for k, v in TRANSPORTS.items()))
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
