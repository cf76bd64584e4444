"""`kvmesh status`: the router's view of the mesh, as a table."""

from __future__ import annotations

import grpc
from rich.console import Console
from rich.table import Table

from kvmesh.grpc_util import insecure_channel
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

_ROLE = {v: k.removeprefix("WORKER_ROLE_").lower()
         for k, v in common_pb2.WorkerRole.items()}


async def print_status(router: str) -> int:
    console = Console()
    async with insecure_channel(router) as channel:
        try:
            reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            console.print(f"[red]router {router} unreachable:[/] {exc.details()}")
            return 1
    table = Table(title=f"kvmesh workers (policy: {reply.policy})")
    for column in ("worker", "model", "role", "running", "waiting", "in flight", "KV usage",
                   "block", "indexed", "seen"):
        table.add_column(column)
    for s in reply.workers:
        w, load = s.worker, s.load
        table.add_row(
            w.worker_id, w.model, _ROLE.get(w.role, "?"), str(load.num_running),
            str(load.num_waiting), str(load.in_flight), f"{load.kv_usage:.1%}",
            str(w.block_size), str(s.indexed_blocks), f"{s.last_seen_age_s:.1f}s ago",
        )
    console.print(table)
    return 0
