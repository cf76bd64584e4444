"""The gateway's FastAPI app: request ids, authentication, body limits, access log and
metrics for every API request, the error handlers, and the endpoint families' routers."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from kvmesh.core.error_map import openai_error_body
from kvmesh.core.errors import AuthenticationError, KvmeshError
from kvmesh.gateway.body_limit import ChunkedBodyLimit
from kvmesh.gateway.core import GatewayCore, new_request_id
from kvmesh.gateway.http import chat, completions, embeddings, lora, models
from kvmesh.gateway.http.streaming import REQUEST_ID_HEADER, error_response
from kvmesh.gateway.lifecycle import answered, arrived, authenticate
from kvmesh.gateway.metrics import OTHER, GatewayMetrics
from kvmesh.gateway.request_log import RequestRecord
from kvmesh.gateway.router_client import PREFERRED_WORKER_HEADER, preferred_worker


def create_app(core: GatewayCore) -> FastAPI:
    app = FastAPI(title="kvmesh gateway", version="0.1.0")
    app.add_middleware(ChunkedBodyLimit, max_body_bytes=core.config.max_body_bytes)
    app.add_middleware(RequestGuard, core=core)
    app.state.core = core
    _map_errors(app, core.metrics)
    for family in (chat, completions, embeddings, models, lora):
        app.include_router(family.router)
    return app


def _refused(request: Request, status: int) -> None:
    """Close the log record of a request refused before routing; it is not counted in
    the requests metric, whose endpoint label takes route templates only (a raw path is
    the client's to choose)."""
    record: RequestRecord = request.state.record
    record.endpoint, record.status = request.url.path, status
    record.done()


class RequestGuard:
    """Every request gets an id (the client's ``x-request-id`` or a new one, echoed on
    the response) and a log record; /v1/ requests are authenticated and their body size
    checked first; the answer is counted when its status line goes out.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
    relays every body message of a response through a memory stream and a task of its
    own, a task switch per streamed token."""

    def __init__(self, app: Any, core: GatewayCore) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        core, request = self.core, Request(scope)
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id("req")
        request.state.request_id = request_id
        request.state.record = arrived(request_id)
        preferred_worker.set(request.headers.get(PREFERRED_WORKER_HEADER, ""))
        refusal = self._refusal(request, request_id)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
                _count(request, message["status"], core)
            await send(message)

        await self.app(scope, receive, answer)

    def _refusal(self, request: Request, request_id: str) -> JSONResponse | None:
        """The answer to a request refused before routing (401, 413), else None."""
        core = self.core
        if request.url.path.startswith("/v1/"):
            try:
                request.state.key = authenticate(core, request.headers.get("authorization"))
            except AuthenticationError as exc:
                _refused(request, 401)
                return error_response(exc, request_id, core.metrics)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > core.config.max_body_bytes:
            body = openai_error_body(
                f"request body of {length} bytes exceeds the limit of "
                f"{core.config.max_body_bytes}", "invalid_request_error", code=413,
            )
            core.metrics.errors.labels("invalid_request_error").inc()
            _refused(request, 413)
            return JSONResponse(body, status_code=413, headers={REQUEST_ID_HEADER: request_id})
        return None


def _count(request: Request, status: int, core: GatewayCore) -> None:
    """Metrics and the access-log line of an API request (not /metrics, /health)."""
    route = request.scope.get("route")
    endpoint = getattr(route, "path", OTHER)
    if endpoint.startswith("/v1/"):
        model = getattr(request.state, "model", None) or ""
        answered(core, endpoint, model, status, request.state.record)


#: OpenAI error types of the HTTP statuses the framework answers on its own.
_FRAMEWORK_ERROR_TYPES = {401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 405: "invalid_request_error"}


def _map_errors(app: FastAPI, metrics: GatewayMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors
        )
        body = openai_error_body(
            message or "invalid request", "invalid_request_error",
            param=".".join(loc) or None, code=400,
        )
        metrics.errors.labels("invalid_request_error").inc()
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, exc: HTTPException) -> JSONResponse:
        """What the framework refuses itself (a body that is not JSON or not UTF-8, an
        unknown path or method) as an OpenAI error object too, not ``{"detail": ...}``."""
        openai_type = _FRAMEWORK_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        message = str(exc.detail)
        if exc.status_code == 400:
            message = f"request body is not valid JSON in UTF-8 ({exc.detail})"
        metrics.errors.labels(openai_type).inc()
        return JSONResponse(openai_error_body(message, openai_type, code=exc.status_code),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(KvmeshError)
    async def kvmesh_error(request: Request, exc: KvmeshError) -> JSONResponse:
        return error_response(exc, getattr(request.state, "request_id", None), metrics)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def grpc_error(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        return error_response(exc, getattr(request.state, "request_id", None), metrics)
