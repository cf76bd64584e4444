"""The request-body limit for bodies sent without Content-Length (chunked).

Bodies that declare their length are checked up front by the HTTP app's middleware;
a chunked body can only be measured while it arrives, so this ASGI layer reads it
(up to the limit), answers 413 past it, and replays it to the app otherwise.
"""

from __future__ import annotations

import json
from typing import Any

from kvmesh.core.error_map import openai_error_body

Message = dict[str, Any]


class ChunkedBodyLimit:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or ())
        if scope["type"] != "http" or b"content-length" in headers:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(headers, send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the disconnect, as usual

        await self.app(scope, replay, send)

    async def _too_large(self, headers: dict[bytes, bytes], send: Any) -> None:
        body = json.dumps(openai_error_body(
            f"request body exceeds the limit of {self.max_body_bytes} bytes",
            "invalid_request_error", code=413)).encode()
        response_headers = [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]
        if b"x-request-id" in headers:
            response_headers.append((b"x-request-id", headers[b"x-request-id"]))
        await send({"type": "http.response.start", "status": 413, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})
