"""gRPC plumbing every kvmesh service shares: server with health + reflection,
the error interceptor, and client channels with sane options.

Every internal channel and listener is made here (:func:`internal_channel`,
:func:`bind`), so one setting (:func:`use_security`, a :class:`SecurityConfig`
each service applies at start) turns mutual TLS on for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import kvmesh.core.tracing as tracing
from kvmesh.core.error_map import grpc_code_for, rich_status, upstream_status
from kvmesh.core.errors import InvalidRequestError, KvmeshError
from kvmesh.core.security_config import SecurityConfig, TlsConfig

#: Where gRPC carries a google.rpc.Status (what grpc_status.rpc_status reads).
GRPC_DETAILS_METADATA_KEY = "grpc-status-details-bin"

log = logging.getLogger(__name__)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10000),
    ("grpc.keepalive_permit_without_calls", True),
]

#: Longest pause between a client channel's attempts to reach a peer that is down.
#: gRPC's default backoff grows to 120 s: a worker whose router was away for seconds
#: would re-register seconds after the router is back, after the restarted router's
#: warm-up gave up waiting for it (router/warmup.py). Mesh peers are few and local.
RECONNECT_BACKOFF_MAX_S = 1.0

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF_MAX_S * 1000)),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_permit_without_calls", True),
    ("grpc.enable_retries", 0),
    # A fixed (64 KiB) flow-control window per stream: with BDP probing the window of
    # a stream grows to megabytes, and a slow HTTP reader's generation piles up in the
    # gateway's gRPC buffers instead of holding the worker back (docs/reliability.md).
    ("grpc.http2.bdp_probe", 0),
]


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps a method's handler once, not on every call: the
    handler the chain returns for a method is the same object call after call, so its
    wrapped handler is kept and handed out again (each call then costs the chain's
    lookup, not new closures and handler objects)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        kept = self._wrapped.get(method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class ErrorInterceptor(WrappingInterceptor):
    """Maps :class:`KvmeshError` raised by a handler to its gRPC status, in one place
    (and passes a failed upstream call's status through)."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _errors_as_status(context):
                    return await inner_uu(_decoded(request), context)

            return _rebuilt(grpc.unary_unary_rpc_method_handler, unary_unary, handler)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _errors_as_status(context):
                    async for item in inner_us(_decoded(request), context):
                        yield item

            return _rebuilt(grpc.unary_stream_rpc_method_handler, unary_stream, handler)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any],
                                    context: grpc.aio.ServicerContext) -> Any:
                async with _errors_as_status(context):
                    async for item in inner_ss(_decoded_stream(requests), context):
                        yield item

            return _rebuilt(grpc.stream_stream_rpc_method_handler, stream_stream, handler)
        return handler


class _Undecodable:
    """A request whose bytes are no valid message of the method's type: the handler
    answers INVALID_ARGUMENT (gRPC's own deserializer failure would be INTERNAL)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the caller's
            return _Undecodable(exc)

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidRequestError(
            f"request is not a valid protobuf message of this method's type: {request.error}")
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _rebuilt(factory: Callable[..., grpc.RpcMethodHandler], behaviour: Callable[..., Any],
             handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    return factory(behaviour, request_deserializer=_tolerant(handler.request_deserializer),
                   response_serializer=handler.response_serializer)


@contextlib.asynccontextmanager
async def _errors_as_status(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except KvmeshError as exc:
        await _abort(context, exc)
    except grpc.aio.AioRpcError as exc:
        await _pass_through(context, exc)
    except NotImplementedError:
        # A contract method this server does not serve (generated base servicers raise
        # it): UNIMPLEMENTED, not the UNKNOWN an unexpected exception becomes.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented here")


#: Trailing metadata naming the request field an error is about (OpenAI's ``param``).
ERROR_PARAM_KEY = "kvmesh-error-param"


async def _abort(context: grpc.aio.ServicerContext, exc: KvmeshError) -> None:
    """Abort with the status code, message and google.rpc.Status details."""
    metadata: list[tuple[str, str | bytes]] = [
        (GRPC_DETAILS_METADATA_KEY, rich_status(exc).SerializeToString())]
    if exc.param:
        metadata.append((ERROR_PARAM_KEY, exc.param))
    await context.abort(grpc_code_for(exc), exc.message, trailing_metadata=tuple(metadata))


async def _pass_through(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError) -> None:
    """A failed upstream call (a worker's refusal, say) keeps its status for our caller,
    as it keeps its HTTP status over the OpenAI API, instead of becoming UNKNOWN; with
    the upstream's google.rpc.Status details, or ours when it sent none."""
    message = exc.details() or exc.code().name
    details = next((value for key, value in exc.trailing_metadata() or ()
                    if key == GRPC_DETAILS_METADATA_KEY and isinstance(value, bytes)), None)
    if details is None:
        details = upstream_status(exc.code(), message).SerializeToString()
    await context.abort(exc.code(), message,
                        trailing_metadata=((GRPC_DETAILS_METADATA_KEY, details),))


def create_server(interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A grpc.aio server: tracing (when on) outermost, then the error map."""
    return grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), ErrorInterceptor(), *interceptors],
        options=SERVER_OPTIONS,
    )


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """Standard health checking (every service SERVING) plus server reflection."""
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


class _Transport:
    """Credentials read once from a :class:`TlsConfig` (a missing or unreadable file
    fails at start, not on the first call)."""

    def __init__(self, tls: TlsConfig | None) -> None:
        self.tls = tls
        self.channel_options = list(CHANNEL_OPTIONS)
        self.channel_credentials: grpc.ChannelCredentials | None = None
        self.server_credentials: grpc.ServerCredentials | None = None
        if tls is None:
            return
        ca, cert, key = (path.read_bytes() for path in (tls.ca_file, tls.cert_file, tls.key_file))
        self.channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert)
        self.server_credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True)
        if tls.server_name:
            self.channel_options.append(("grpc.ssl_target_name_override", tls.server_name))


_transport = _Transport(None)


def use_security(security: SecurityConfig) -> None:
    """Make every internal channel and listener of this process follow ``security``
    (mutual TLS when ``security.tls`` is set); each service calls it as it starts."""
    global _transport
    _transport = _Transport(security.tls)
    if security.tls is not None:
        log.info("mutual TLS on internal gRPC (CA %s, certificate %s)",
                 security.tls.ca_file, security.tls.cert_file)


def tls_enabled() -> bool:
    return _transport.tls is not None


def bind(server: grpc.aio.Server, host: str, port: int, *, public: bool = False) -> int:
    """Bind ``host:port`` (port 0 picks a free one) and return the bound port: with
    mutual TLS on (:func:`use_security`), internal listeners take only clients with a
    certificate from the mesh's CA; ``public`` listeners (the gateway's Inference API,
    the edge's ADS server for Envoy) stay plaintext."""
    address = f"{host}:{port}"
    credentials = None if public else _transport.server_credentials
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    return bound


def internal_channel(target: str) -> grpc.aio.Channel:
    """A client channel to another kvmesh service: mutual TLS when on; with tracing on,
    request-path calls carry ``traceparent``."""
    interceptors = tracing.client_interceptors() or None
    if _transport.channel_credentials is None:
        return grpc.aio.insecure_channel(
            target, options=_transport.channel_options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, _transport.channel_credentials,
                                   options=_transport.channel_options,
                                   interceptors=interceptors)


async def wait_serving(target: str, timeout_s: float, service: str = "") -> None:
    """Block until ``target`` answers SERVING on the standard health service."""
    async with internal_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as exc:
                last = exc
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f}s (last error: {last})")
