"""kvmesh's typed errors and the one table that maps them to gRPC and HTTP.

Pure code raises these; the gRPC interceptor turns them into a status with details,
and the gateway turns a gRPC status into an HTTP status + OpenAI error JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2


class KvmeshError(Exception):
    """Base class: carries the gRPC status code it maps to and an OpenAI error type."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    openai_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(KvmeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    openai_type = "invalid_request_error"


class ModelNotFoundError(KvmeshError):
    code = grpc.StatusCode.NOT_FOUND
    openai_type = "not_found_error"


class NoWorkerAvailableError(KvmeshError):
    code = grpc.StatusCode.UNAVAILABLE
    openai_type = "service_unavailable"


class AuthenticationError(KvmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    openai_type = "authentication_error"


class RateLimitedError(KvmeshError):
    """Too many requests (per key) or the gateway is overloaded: retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    openai_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class WorkerNotFoundError(KvmeshError):
    code = grpc.StatusCode.NOT_FOUND
    openai_type = "not_found_error"


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


def openai_error_body(
    message: str, openai_type: str, *, param: str | None = None, code: str | int | None = None
) -> dict[str, dict[str, object]]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": openai_type, "param": param, "code": code}}


def rich_status(exc: KvmeshError) -> status_pb2.Status:
    """The error as a ``google.rpc.Status`` with details gRPC clients can read
    (``grpc_status.rpc_status.from_call``): ``ErrorInfo`` (reason = the OpenAI error
    type, metadata.param), ``BadRequest`` naming the offending field, ``RetryInfo``
    for rate limits."""
    details = [error_details_pb2.ErrorInfo(
        reason=exc.openai_type, domain="kvmesh",
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
    return status_pb2.Status(code=exc.code.value[0], message=exc.message, details=packed)
