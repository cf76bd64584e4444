"""A worker's role and its one mapping to and from the protobuf enum.

``both`` serves whole requests; ``prefill`` computes a prompt's KV cache and hands it
over; ``decode`` continues from KV cache it receives (vLLM's KV connector, NIXL).
The router, the gateway and the worker all read roles from here.
"""

from __future__ import annotations

from enum import StrEnum

from kvmesh.v1 import common_pb2


class WorkerRole(StrEnum):
    both = "both"
    prefill = "prefill"
    decode = "decode"


_TO_PROTO = {
    WorkerRole.both: common_pb2.WORKER_ROLE_BOTH,
    WorkerRole.prefill: common_pb2.WORKER_ROLE_PREFILL,
    WorkerRole.decode: common_pb2.WORKER_ROLE_DECODE,
}
_FROM_PROTO: dict[int, WorkerRole] = {value: role for role, value in _TO_PROTO.items()}


def role_to_proto(role: WorkerRole | str) -> common_pb2.WorkerRole:
    return _TO_PROTO[WorkerRole(role)]


def role_from_proto(value: int) -> WorkerRole:
    """The role a protobuf value names; unspecified (an older client) means ``both``."""
    return _FROM_PROTO.get(value, WorkerRole.both)
