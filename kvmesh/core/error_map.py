"""The one error map: a kvmesh error kind → gRPC status; a gRPC status → HTTP status
and OpenAI error type; and the error details both doors send.

Pure code raises ``kvmesh.core.errors`` (no grpc there); the gRPC interceptor
(``grpc_util``) aborts with ``grpc_code_for(exc)`` and ``rich_status(exc)``, and the
gateway's HTTP handler answers ``http_error_for(...)`` with ``openai_error_body``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from kvmesh.core.errors import ErrorKind, KvmeshError, RateLimitedError

#: The one table from an error kind to the gRPC status it is sent as.
KIND_TO_GRPC: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_code_for(exc: KvmeshError) -> grpc.StatusCode:
    return KIND_TO_GRPC[exc.kind]


@dataclass(frozen=True)
class HttpError:
    """How a gRPC status is presented over HTTP."""

    status: int
    openai_type: str


#: The one table from gRPC status to HTTP status and OpenAI error type.
GRPC_TO_HTTP: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: HttpError(404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: HttpError(409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: HttpError(499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: HttpError(501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "timeout"),
}

_DEFAULT_HTTP = HttpError(500, "internal_error")


def http_error_for(code: grpc.StatusCode) -> HttpError:
    return GRPC_TO_HTTP.get(code, _DEFAULT_HTTP)


def http_error_of(exc: KvmeshError) -> HttpError:
    """How a kvmesh error is presented over HTTP (through its gRPC status, so both
    doors agree)."""
    return http_error_for(grpc_code_for(exc))


def openai_error_body(
    message: str, openai_type: str, *, param: str | None = None, code: str | int | None = None
) -> dict[str, dict[str, object]]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": openai_type, "param": param, "code": code}}


def upstream_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    """The details of a status passed on from an upstream service that sent none (a
    vLLM worker's refusal): ``ErrorInfo`` with the OpenAI error type, marked upstream."""
    holder = any_pb2.Any()
    holder.Pack(error_details_pb2.ErrorInfo(
        reason=http_error_for(code).openai_type, domain="kvmesh",
        metadata={"source": "upstream"}))
    return status_pb2.Status(code=code.value[0], message=message, details=[holder])


def rich_status(exc: KvmeshError) -> status_pb2.Status:
    """The error as a ``google.rpc.Status`` with details gRPC clients can read
    (``grpc_status.rpc_status.from_call``): ``ErrorInfo`` (reason = the OpenAI error
    type, metadata.param), ``BadRequest`` naming the offending field, ``RetryInfo``
    for rate limits."""
    details = [error_details_pb2.ErrorInfo(
        reason=http_error_of(exc).openai_type, domain="kvmesh",
        metadata={"param": exc.param} if exc.param else {},
    )]
    if exc.param:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=exc.param, description=exc.message)]))
    if isinstance(exc, RateLimitedError):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.seconds = exc.retry_after_s
        details.append(retry)
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=grpc_code_for(exc).value[0], message=exc.message, details=packed)
