"""Hypothesis strategies for protobuf fuzzing, driven by message descriptors: random
messages of any type (every field, extreme integers, NaN/inf floats, unknown enum
values, nested to a bounded depth) and byte-level mutations of valid ones (flips,
insertions, deletions, truncations), plus the check every answer must pass."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory
from grpc_status import rpc_status
from hypothesis import strategies as st

FD = descriptor.FieldDescriptor
MAX_DEPTH = 3

_INTS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Small values (what handlers mostly see) and the extremes (what breaks them)."""
    return st.one_of(st.integers(max(low, -8), min(high, 64)), st.integers(low, high),
                     st.sampled_from([low, high, max(low, -1), 0]))


def _scalar(field: FD, depth: int) -> st.SearchStrategy[Any] | None:
    if field.type in _INTS:
        return _ints(*_INTS[field.type])
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FD.TYPE_DOUBLE:
        return st.floats()
    if field.type == FD.TYPE_STRING:
        return st.text(max_size=40)
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                         st.integers(-5, 1000))
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1) if depth < MAX_DEPTH else None
    return None


def messages(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Random instances of the message type ``desc``."""
    cls = message_factory.GetMessageClass(desc)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"], depth)
            value = _scalar(field.message_type.fields_by_name["value"], depth)
            if key is not None and value is not None:
                optional[field.name] = st.dictionaries(key, value, max_size=4)
            continue
        value = _scalar(field, depth)
        if value is None:
            continue
        optional[field.name] = (st.lists(value, max_size=6)
                                if field.is_repeated else value)
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: _build(cls, kw))


def _build(cls: type[message.Message], values: dict[str, Any]) -> message.Message:
    msg = cls()
    for name, value in values.items():
        field = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if isinstance(value, dict):
            if field.message_type.fields_by_name["value"].message_type is not None:
                for k, v in value.items():
                    target[k].CopyFrom(v)
            else:
                target.update(value)
        elif field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[message.Message]) -> bytes:
    """A valid message's bytes, then 1-4 byte-level edits: mostly still parseable with
    odd values, sometimes no protobuf at all."""
    data = bytearray(draw(valid).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, len(data)))
        if edit == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete" and data:
            del data[at:at + draw(st.integers(1, 4))]
        elif edit == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


#: What a handler may answer besides OK: statuses that say what the caller did wrong or
#: what state the service is in. UNKNOWN (an exception escaped a handler) and INTERNAL
#: (gRPC's own failure to decode, or a crash mapped blindly) mean a defect.
ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS,
}
#: Statuses kvmesh's own code raises; they must carry google.rpc.Status details.
WITH_DETAILS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED}


def check_error(error: grpc.RpcError, what: str) -> grpc.StatusCode:
    code = error.code()  # type: ignore[attr-defined]
    details = error.details()  # type: ignore[attr-defined]
    assert code in ACCEPTABLE, f"{what}: {code.name} {details}"
    assert details, f"{what}: {code.name} without a message"
    if code in WITH_DETAILS:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None and status.details, \
            f"{what}: {code.name} without google.rpc.Status details: {details}"
    return code  # type: ignore[no-any-return]
