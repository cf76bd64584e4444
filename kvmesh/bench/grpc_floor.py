"""What one gRPC call costs a Python server before any work (``python -m
kvmesh.bench.grpc_floor``): the floor under the router's per-call cost.

A server process on one core answers an empty ``RouteBatch`` (the router's servicer
class, no work in it); a client on the other core calls it back to back. Three servers,
taking turns: grpc.aio with no interceptor, grpc.aio with the interceptors every kvmesh
service has (``ErrorInterceptor`` and ``InflightCalls``), and grpc's thread-pool server.
Printed per server: its CPU per call (from /proc, so what the client does is not in it)
and the client's round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil

from kvmesh.bench.router_rpc import cores, pinned
from kvmesh.core.drain import InflightCalls
from kvmesh.core.grpc_util import SERVER_OPTIONS, ErrorInterceptor
from kvmesh.v1 import router_pb2, router_pb2_grpc

SERVERS = ("aio", "aio+interceptors", "sync")


class _Aio(router_pb2_grpc.RouterServicer):
    async def RouteBatch(self, request: Any, context: Any) -> router_pb2.RouteBatchResponse:
        return router_pb2.RouteBatchResponse()


class _Sync(router_pb2_grpc.RouterServicer):
    def RouteBatch(self, request: Any, context: Any) -> router_pb2.RouteBatchResponse:
        return router_pb2.RouteBatchResponse()


def serve(kind: str, port_file: Path) -> None:
    """Run one server until killed; its port goes to ``port_file``."""
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(4), options=SERVER_OPTIONS)
        router_pb2_grpc.add_RouterServicer_to_server(_Sync(), server)
        port_file.write_text(str(server.add_insecure_port("127.0.0.1:0")))
        server.start()
        server.wait_for_termination()
        return

    async def run() -> None:
        interceptors = ([ErrorInterceptor(), InflightCalls(("Route", "RouteBatch"))]
                        if kind == "aio+interceptors" else [])
        server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        router_pb2_grpc.add_RouterServicer_to_server(_Aio(), server)
        port_file.write_text(str(server.add_insecure_port("127.0.0.1:0")))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


async def _calls(port: int, n: int) -> float:
    """Seconds per call, ``n`` calls back to back (after 200 to warm up)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for _ in range(200):
            await stub.RouteBatch(router_pb2.RouteBatchRequest())
        started = time.perf_counter()
        for _ in range(n):
            await stub.RouteBatch(router_pb2.RouteBatchRequest())
        return (time.perf_counter() - started) / n


def measure(kind: str, calls: int, workdir: Path) -> dict[str, Any]:
    server_core, client_cores = cores()
    port_file = workdir / f"{kind}.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(pinned([sys.executable, "-m", "kvmesh.bench.grpc_floor",
                                    "--serve", kind, "--port-file", str(port_file)],
                                   server_core))
    me = psutil.Process()
    affinity = me.cpu_affinity()
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.05)
        server = psutil.Process(proc.pid)
        if client_cores:
            me.cpu_affinity(sorted(client_cores))
        before = server.cpu_times()
        round_trip = asyncio.run(_calls(int(port_file.read_text()), calls))
        after = server.cpu_times()
    finally:
        me.cpu_affinity(affinity)
        proc.kill()
        proc.wait()
    cpu = (after.user + after.system) - (before.user + before.system)
    return {"server": kind, "server_cpu_us_per_call": round(cpu / (calls + 200) * 1e6, 1),
            "round_trip_us": round(round_trip * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every server")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port_file)
        return 0
    runs = []
    with tempfile.TemporaryDirectory(prefix="kvmesh-grpc-floor-") as d:
        for r in range(args.rounds):
            order = SERVERS if r % 2 == 0 else tuple(reversed(SERVERS))
            runs += [{"round": r, **measure(kind, args.calls, Path(d))} for kind in order]
    print(json.dumps({"calls": args.calls, "load_avg": os.getloadavg(), "runs": runs},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
