"""The gateway's request middleware relays a streamed response's frames in the task
that produces them (no per-frame hop through another task, as Starlette's
BaseHTTPMiddleware makes), and still tags, counts and refuses requests as before."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.responses import StreamingResponse

from kvmesh.core.config import GatewayConfig
from kvmesh.gateway.core import GatewayCore
from kvmesh.gateway.http.app import create_app

pytestmark = pytest.mark.unit
FRAMES = 5


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
            "headers": headers, "query_string": b"", "asgi": {"version": "3.0"},
            "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1), "root_path": ""}


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]]
               ) -> tuple[list[dict[str, Any]], list[asyncio.Task[Any] | None]]:
    sent: list[dict[str, Any]] = []
    senders: list[asyncio.Task[Any] | None] = []

    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if requested:  # the client stays until the response is done
            await asyncio.Event().wait()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            senders.append(asyncio.current_task())

    await app(scope(path, headers), receive, send)
    return sent, senders


@pytest.fixture
async def app_and_core() -> tuple[Any, GatewayCore]:
    core = GatewayCore(GatewayConfig(api_keys=["sk-one"]))
    app = create_app(core)
    producers: list[asyncio.Task[Any] | None] = []

    @app.get("/v1/stream-test")
    async def stream() -> StreamingResponse:
        async def frames() -> AsyncIterator[str]:
            for i in range(FRAMES):
                producers.append(asyncio.current_task())
                yield f"data: {i}\n\n"
        return StreamingResponse(frames(), media_type="text/event-stream")

    app.state.producers = producers
    return app, core


async def test_streamed_frames_go_out_from_the_producing_task(app_and_core) -> None:
    app, core = app_and_core
    sent, senders = await call(app, "/v1/stream-test", [
        (b"authorization", b"Bearer sk-one"), (b"x-request-id", b"rid-7")])
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 200
    assert (b"x-request-id", b"rid-7") in start["headers"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(FRAMES))
    assert len(senders) == FRAMES and senders == app.state.producers
    counted = core.metrics.requests.labels("other", "/v1/stream-test", "200")._value.get()
    assert counted == 1


async def test_refusals_still_answered_with_the_request_id(app_and_core) -> None:
    app, _ = app_and_core
    sent, _ = await call(app, "/v1/stream-test", [(b"x-request-id", b"rid-8")])
    start = sent[0]
    assert start["status"] == 401 and (b"x-request-id", b"rid-8") in start["headers"]
    sent, _ = await call(app, "/v1/stream-test", [
        (b"authorization", b"Bearer sk-one"), (b"content-length", b"99999999999")])
    assert sent[0]["status"] == 413
