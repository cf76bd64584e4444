"""Graceful drain, shared by every service: say NOT_SERVING first, let what is in
flight finish within a deadline, then stop.

A service on SIGTERM (``run_until_signalled``) calls its ``stop``, which drains:
gRPC health turns NOT_SERVING (HTTP readiness fails on the gateway), so load
balancers, the edge and health-checking clients send new work elsewhere; the router
stops routing to a draining worker (``DrainWorker``); requests already running finish
until none is left or ``drain_timeout_s`` passes; only then do the listeners close.
``InflightCalls`` counts the RPCs that must finish (a worker's ``Generate``, a router's
``Route``), leaving long-lived streams (event feeds, watches) out of the count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from kvmesh.core.grpc_util import WrappingInterceptor

log = logging.getLogger(__name__)


class InflightCalls(WrappingInterceptor):
    """Counts the calls in flight of the named methods (``/pkg.Service/Method``'s
    last part), unary or server-streaming, so a drain knows when they are done."""

    def __init__(self, methods: Iterable[str]) -> None:
        super().__init__()
        self._methods = frozenset(methods)
        self.count = 0

    def _enter(self) -> None:
        self.count += 1

    def _exit(self) -> None:
        self.count -= 1

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method.rpartition("/")[2] not in self._methods:
            return handler
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                self._enter()
                try:
                    return await inner_uu(request, context)
                finally:
                    self._exit()

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                self._enter()
                try:
                    async for item in inner_us(request, context):
                        yield item
                finally:
                    self._exit()

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


async def not_serving(health: Any) -> None:
    """Every service of a health servicer to NOT_SERVING: grpc's own
    (``enter_graceful_shutdown``) or vLLM's (``set_not_serving``)."""
    if health is None:
        return
    if hasattr(health, "set_not_serving"):
        health.set_not_serving()
    else:
        await health.enter_graceful_shutdown()


async def wait_idle(in_flight: Callable[[], int], timeout_s: float, what: str,
                    poll_s: float = 0.05) -> bool:
    """Wait until ``in_flight()`` is 0 or ``timeout_s`` passes; True when idle."""
    started = time.monotonic()
    left = in_flight()
    if left:
        log.info("draining %s: %d in flight, up to %.0f s", what, left, timeout_s)
    while left and time.monotonic() - started < timeout_s:
        await asyncio.sleep(poll_s)
        left = in_flight()
    if left:
        log.warning("drain of %s timed out after %.1f s with %d still in flight", what,
                    timeout_s, left)
        return False
    if time.monotonic() - started > poll_s:
        log.info("drained %s in %.1f s", what, time.monotonic() - started)
    return True
