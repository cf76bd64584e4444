"""gRPC plumbing every kvmesh service shares: server with health + reflection,
the error interceptor, and client channels with sane options."""

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
from kvmesh.core.error_map import grpc_code_for, rich_status
from kvmesh.core.errors import KvmeshError

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

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps :class:`KvmeshError` raised by a handler to its gRPC status, in one place
    (and passes a failed upstream call's status through)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _errors_as_status(context):
                    return await inner_uu(request, context)

            return _rebuilt(grpc.unary_unary_rpc_method_handler, unary_unary, handler)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _errors_as_status(context):
                    async for item in inner_us(request, context):
                        yield item

            return _rebuilt(grpc.unary_stream_rpc_method_handler, unary_stream, handler)
        return handler


def _rebuilt(factory: Callable[..., grpc.RpcMethodHandler], behaviour: Callable[..., Any],
             handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    return factory(behaviour, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


@contextlib.asynccontextmanager
async def _errors_as_status(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except KvmeshError as exc:
        await _abort(context, exc)
    except grpc.aio.AioRpcError as exc:
        await _pass_through(context, exc)


async def _abort(context: grpc.aio.ServicerContext, exc: KvmeshError) -> None:
    """Abort with the status code, message and google.rpc.Status details."""
    metadata: list[tuple[str, str | bytes]] = [
        (GRPC_DETAILS_METADATA_KEY, rich_status(exc).SerializeToString())]
    if exc.param:
        metadata.append(("kvmesh-error-param", exc.param))
    await context.abort(grpc_code_for(exc), exc.message, trailing_metadata=tuple(metadata))


async def _pass_through(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError) -> None:
    """A failed upstream call (a worker's refusal, say) keeps its status for our caller,
    as it keeps its HTTP status over the OpenAI API, instead of becoming UNKNOWN."""
    await context.abort(exc.code(), exc.details() or exc.code().name)


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


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind ``host:port`` (port 0 picks a free one) and return the bound port."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {host}:{port}")
    return bound


def insecure_channel(target: str) -> grpc.aio.Channel:
    """A client channel; with tracing on, request-path calls carry ``traceparent``."""
    return grpc.aio.insecure_channel(
        target, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors() or None)


async def wait_serving(target: str, timeout_s: float, service: str = "") -> None:
    """Block until ``target`` answers SERVING on the standard health service."""
    async with insecure_channel(target) as channel:
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
