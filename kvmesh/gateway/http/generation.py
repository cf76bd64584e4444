"""The HTTP door's half of a generation (chat and completions alike): run the
lifecycle, then answer with a JSON body or an SSE stream, cancelling the generation if
the client leaves before it is answered."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvmesh.gateway.admission import ANONYMOUS
from kvmesh.gateway.core import GatewayCore, new_request_id
from kvmesh.gateway.http.streaming import cancel_on_disconnect, primed
from kvmesh.gateway.lifecycle import Event, Prepared, generate
from kvmesh.gateway.request_log import RequestRecord
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest

E = TypeVar("E")


@dataclass(frozen=True)
class Renderer(Generic[E]):
    """How one endpoint family shapes a generation's events.

    ``stream_events`` turns the lifecycle's events into the family's (chat: content,
    reasoning, tool calls); ``frames`` renders those as SSE frames (ending in [DONE]);
    ``collect`` reads them all into the non-streaming JSON body."""

    stream_events: Callable[[AsyncIterator[Event]], AsyncIterator[E]]
    frames: Callable[[AsyncIterator[E]], AsyncIterator[str]]
    collect: Callable[[AsyncIterator[Event]], Awaitable[dict[str, Any]]]


Body = TypeVar("Body", ChatCompletionRequest, CompletionRequest)
#: An endpoint family's renderer for one request: (prepared, id, created, include_usage,
#: the HTTP request) → how its events become the response.
RendererFactory = Callable[[Prepared, str, int, bool, Request], Renderer[E]]


async def serve_generation(
    request: Request, body: Body, prepare: Callable[[GatewayCore, Body], Awaitable[Prepared]],
    id_prefix: str, endpoint: str, renderer: RendererFactory[E],
) -> JSONResponse | StreamingResponse | None:
    """A chat or completion request from its parsed body to its response."""
    request.state.model = body.model
    prepared = await prepare(core_of(request), body)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(request, prepared, id_prefix, endpoint,
                         lambda rid, created: renderer(prepared, rid, created, include_usage,
                                                       request))


def core_of(request: Request) -> GatewayCore:
    core: GatewayCore = request.app.state.core
    return core


async def respond(request: Request, prepared: Prepared, id_prefix: str, endpoint: str,
                  renderer: Callable[[str, int], Renderer[E]]
                  ) -> JSONResponse | StreamingResponse | None:
    """Generate ``prepared`` and answer; None when the client left first."""
    core = core_of(request)
    request_id = new_request_id(id_prefix)
    render = renderer(request_id, int(time.time()))
    record: RequestRecord = request.state.record
    record.endpoint = endpoint  # the route's, as the answer is counted under
    events = generate(core, getattr(request.state, "key", ANONYMOUS), prepared, request_id,
                      record)
    if prepared.stream:
        # Until the first token, nothing is written that would notice a client gone
        # mid-prefill: watch for the disconnect meanwhile.
        first = await cancel_on_disconnect(request, primed(render.stream_events(events)))
        if first is None:
            await events.aclose()  # cancelled, perhaps before it started: free the slot
            return None
        return StreamingResponse(render.frames(first), media_type="text/event-stream")
    body = await cancel_on_disconnect(request, render.collect(events))
    if body is None:
        await events.aclose()
        return None
    return JSONResponse(body)
