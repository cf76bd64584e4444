"""A worker's role and its one mapping to and from the protobuf enum.

``both`` serves whole requests; ``prefill`` computes a prompt's KV cache and hands it
over; ``decode`` continues from KV cache it receives (vLLM's KV connector, NIXL).
The router, the gateway and the worker all read roles from here. A gateway replica
registers with the router too, under the role ``gateway`` (``GATEWAY``): listed for
discovery (the edge), never a worker a request is routed to.
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

#: The role of a registered gateway replica (not a WorkerRole: no worker runs as one).
GATEWAY = "gateway"


def role_to_proto(role: WorkerRole | str) -> common_pb2.WorkerRole:
    if role == GATEWAY:
        return common_pb2.WORKER_ROLE_GATEWAY
    return _TO_PROTO[WorkerRole(role)]


def is_gateway(value: int) -> bool:
    """Whether a registration's protobuf role is a gateway replica's."""
    return value == common_pb2.WORKER_ROLE_GATEWAY


def role_from_proto(value: int) -> WorkerRole:
    """The role a protobuf value names; unspecified (an older client) means ``both``."""
    return _FROM_PROTO.get(value, WorkerRole.both)
