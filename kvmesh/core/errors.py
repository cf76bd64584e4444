"""kvmesh's typed errors: each carries a neutral kind, nothing of gRPC or HTTP.

Pure code (policies, registry, translation, parsers) raises these without importing
grpc; ``kvmesh.core.error_map`` is the one table from a kind to a gRPC status and an
HTTP status + OpenAI error type, used by the gRPC interceptor and the HTTP handler.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What went wrong, in words both doors can present."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class KvmeshError(Exception):
    """Base class: a message, the kind, and the request field at fault (if any)."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(KvmeshError):
    kind = ErrorKind.INVALID_ARGUMENT


class ModelNotFoundError(KvmeshError):
    kind = ErrorKind.NOT_FOUND


class NoWorkerAvailableError(KvmeshError):
    kind = ErrorKind.UNAVAILABLE


class AuthenticationError(KvmeshError):
    kind = ErrorKind.UNAUTHENTICATED


class RateLimitedError(KvmeshError):
    """Too many requests (per key) or the gateway is overloaded: retry later."""

    kind = ErrorKind.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_s: int = 1, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class WorkerNotFoundError(KvmeshError):
    kind = ErrorKind.NOT_FOUND


class ModelExistsError(KvmeshError):
    """A model id the mesh already serves was added again."""

    kind = ErrorKind.ALREADY_EXISTS
