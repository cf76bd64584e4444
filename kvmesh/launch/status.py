"""`kvmesh status`: the router's view of the mesh, as tables (workers, then models)."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from kvmesh.core.grpc_util import internal_channel, use_security
from kvmesh.core.roles import role_from_proto
from kvmesh.core.security_config import SecurityConfig, TlsConfig
from kvmesh.v1 import router_pb2, router_pb2_grpc


def worker_table(reply: router_pb2.ListWorkersResponse) -> Table:
    table = Table(title=f"kvmesh workers (policy: {reply.policy})")
    for column in ("worker", "model", "adapters", "role", "running", "waiting", "in flight",
                   "KV usage", "cache hit rate", "block", "indexed", "metrics", "seen"):
        table.add_column(column)
    for s in reply.workers:
        w, load = s.worker, s.load
        table.add_row(
            w.worker_id, w.model, ", ".join(w.adapters) or "-", role_from_proto(w.role).value,
            str(load.num_running), str(load.num_waiting), str(load.in_flight),
            f"{load.kv_usage:.1%}", f"{load.cache_hit_rate:.1%}", str(w.block_size),
            str(s.indexed_blocks), w.metrics_endpoint or "-", f"{s.last_seen_age_s:.1f}s ago",
        )
    return table


def model_table(reply: router_pb2.ListWorkersResponse) -> Table:
    """Per model: its routing policy, workers, adapters across them, summed load, mean
    cache hit rate."""
    table = Table(title="models")
    for column in ("model", "policy", "workers", "adapters", "running", "waiting",
                   "in flight", "cache hit rate"):
        table.add_column(column)
    by_model: dict[str, list[router_pb2.WorkerStatus]] = {}
    for s in reply.workers:
        by_model.setdefault(s.worker.model, []).append(s)
    for model, statuses in sorted(by_model.items()):
        adapters = sorted({a for s in statuses
                           for a in (*s.worker.adapters, *s.worker.servable_adapters)})
        hit_rate = sum(s.load.cache_hit_rate for s in statuses) / len(statuses)
        policy = next((s.worker.routing_policy for s in statuses if s.worker.routing_policy),
                      reply.policy)
        table.add_row(
            model, policy, str(len(statuses)), ", ".join(adapters) or "-",
            str(sum(s.load.num_running for s in statuses)),
            str(sum(s.load.num_waiting for s in statuses)),
            str(sum(s.load.in_flight for s in statuses)), f"{hit_rate:.1%}",
        )
    return table


async def print_status(router: str, console: Console | None = None,
                       as_json: bool = False, mesh: dict[str, Any] | None = None) -> int:
    """The router's view as tables, or (``as_json``) one JSON object for scripts: the
    router's ListWorkers answer plus the `kvmesh up` state it was found through.
    ``router`` may list several replicas (comma-separated): the first that answers is
    asked, and the ones that did not are named."""
    console = console or Console()
    if mesh is not None and mesh.get("tls"):  # a mesh with mutual TLS on
        use_security(SecurityConfig(tls=TlsConfig.model_validate(mesh["tls"])))
    addresses = [a.strip() for a in router.split(",") if a.strip()]
    if mesh is not None:
        addresses = list(dict.fromkeys([*addresses, *mesh.get("routers", [])]))
    unreachable: dict[str, str] = {}
    reply: router_pb2.ListWorkersResponse | None = None
    for address in addresses:
        try:
            reply = await _list_workers(address)
        except grpc.aio.AioRpcError as exc:
            unreachable[address] = exc.details() or exc.code().name
            continue
        router = address
        break
    errors = Console(stderr=True)  # stdout stays the answer (JSON for scripts)
    for address, why in unreachable.items():
        errors.print(f"[red]router {address} unreachable:[/] {why}", highlight=False)
    if reply is None:
        return 1
    if as_json:
        body = {"router": router, "unreachable_routers": sorted(unreachable),
                **json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)}
        if mesh is not None:
            body["mesh"] = mesh
        print(json.dumps(body, indent=2))
        return 0
    console.print(worker_table(reply))
    console.print(model_table(reply))
    return 0


async def _list_workers(address: str) -> router_pb2.ListWorkersResponse:
    async with internal_channel(address) as channel:
        return await router_pb2_grpc.RouterStub(channel).ListWorkers(
            router_pb2.ListWorkersRequest(), timeout=5)
