"""HTTP plumbing the endpoints share: the error response, SSE frames, the first event
pulled before the status line, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse

from kvmesh.core.error_map import http_error_for, http_error_of, openai_error_body
from kvmesh.core.errors import AuthenticationError, KvmeshError, RateLimitedError
from kvmesh.core.grpc_util import ERROR_PARAM_KEY
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.pipeline import Finished
from kvmesh.gateway.schemas import Usage

log = logging.getLogger(__name__)
T = TypeVar("T")
REQUEST_ID_HEADER = "x-request-id"


def error_response(exc: Exception, request_id: str | None = None,
                   metrics: GatewayMetrics | None = None) -> JSONResponse:
    """The one place an exception becomes an HTTP status + OpenAI error JSON."""
    headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    if isinstance(exc, KvmeshError):
        http = http_error_of(exc)
        body = openai_error_body(exc.message, http.openai_type, param=exc.param, code=http.status)
        if isinstance(exc, RateLimitedError):
            headers["retry-after"] = str(exc.retry_after_s)
        if isinstance(exc, AuthenticationError):
            headers["www-authenticate"] = "Bearer"
    elif isinstance(exc, grpc.aio.AioRpcError):
        http = http_error_for(exc.code())
        param = dict(exc.trailing_metadata() or ()).get(ERROR_PARAM_KEY)
        body = openai_error_body(
            exc.details() or exc.code().name, http.openai_type, param=param, code=http.status
        )
        if http.status == 429:
            headers["retry-after"] = "1"
    else:
        log.exception("internal error", exc_info=exc)
        http = http_error_for(grpc.StatusCode.INTERNAL)
        body = openai_error_body(f"internal error: {exc}", http.openai_type, code=http.status)
    if metrics is not None:
        metrics.errors.labels(http.openai_type).inc()
    return JSONResponse(body, status_code=http.status, headers=headers or None)


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client goes away first, cancel it (aborting the engine)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        log.info("client disconnected; generation cancelled")
        return None
    return task.result()


async def primed(events: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pull the first event now, so routing and admission errors become proper HTTP
    statuses instead of in-band stream errors; then replay it and the rest."""
    iterator = aiter(events)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return _empty()
    except BaseException:
        await iterator.aclose()  # type: ignore[attr-defined]
        raise

    async def replay() -> AsyncIterator[T]:
        async with contextlib.aclosing(iterator):  # type: ignore[type-var]
            yield first
            async for item in iterator:
                yield item

    return replay()


async def _empty() -> AsyncIterator[Any]:
    return
    yield


def sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def without_null_usage(payload: dict[str, Any]) -> dict[str, Any]:
    if payload.get("usage") is None:
        payload.pop("usage", None)
    return payload


async def event_frames(
    events: AsyncIterator[T | Finished], frame: Callable[[T], str | None],
    usage: Callable[[Usage], str] | None,
) -> AsyncIterator[str]:
    """SSE frames of a generation's events: ``frame`` renders each choice event (None:
    nothing to send), ``usage`` the final usage chunk (None: the client did not ask for
    it). Closing the frames closes the events, which cancels the generation."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, Finished):
                if usage is not None:
                    yield usage(event.usage)
                continue
            text = frame(event)
            if text is not None:
                yield text


async def with_stream_errors(
    events: AsyncIterator[str], metrics: GatewayMetrics | None = None
) -> AsyncIterator[str]:
    """Errors after the response started can only be reported in-band; then [DONE]."""
    try:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for item in events:
                yield item
    except (KvmeshError, grpc.aio.AioRpcError) as exc:
        response = error_response(exc, metrics=metrics)
        yield sse(json.loads(bytes(response.body)))
    yield sse("[DONE]")
