"""The gateway's FastAPI app: request ids, authentication, body limits, access log and
metrics for every API request, the error handlers, and the endpoint families' routers."""

from __future__ import annotations

import time
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvmesh.core.error_map import openai_error_body
from kvmesh.core.errors import AuthenticationError, KvmeshError
from kvmesh.core.logs import request_id_var
from kvmesh.core.tracing import current_trace_id
from kvmesh.gateway.body_limit import ChunkedBodyLimit
from kvmesh.gateway.core import GatewayCore, new_request_id
from kvmesh.gateway.http import chat, completions, embeddings, models
from kvmesh.gateway.http.streaming import REQUEST_ID_HEADER, error_response
from kvmesh.gateway.metrics import OTHER, GatewayMetrics
from kvmesh.gateway.request_log import RequestRecord


def create_app(core: GatewayCore) -> FastAPI:
    app = FastAPI(title="kvmesh gateway", version="0.1.0")
    app.add_middleware(ChunkedBodyLimit, max_body_bytes=core.config.max_body_bytes)
    app.state.core = core
    app.state.metrics = core.metrics
    _guard_requests(app, core)
    _map_errors(app, core.metrics)
    for family in (chat, completions, embeddings, models):
        app.include_router(family.router)
    return app


def _done(request: Request, endpoint: str, status: int, model: str | None = None) -> None:
    record: RequestRecord = request.state.record
    record.endpoint, record.model, record.status = endpoint, model or "", status
    record.done()


def _guard_requests(app: FastAPI, core: GatewayCore) -> None:
    """Every request gets an id (the client's ``x-request-id`` or a new one) and a log
    record; /v1/ requests are authenticated and their body size checked first."""
    metrics = core.metrics

    @app.middleware("http")
    async def request_id_auth_and_limits(request: Request, call_next: Any) -> Any:
        request.state.started = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id("req")
        request.state.request_id = request_id
        request_id_var.set(request_id)
        request.state.record = RequestRecord(request_id, request.state.started,
                                             trace_id=current_trace_id())
        if request.url.path.startswith("/v1/"):
            try:
                request.state.key = core.admission.authenticate(
                    request.headers.get("authorization"))
            except AuthenticationError as exc:
                metrics.auth_failure(
                    "missing_key" if "authorization" not in request.headers else "invalid_key")
                _done(request, request.url.path, 401)
                return error_response(exc, request_id, metrics)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > core.config.max_body_bytes:
            body = openai_error_body(
                f"request body of {length} bytes exceeds the limit of "
                f"{core.config.max_body_bytes}", "invalid_request_error", code=413,
            )
            metrics.errors.labels("invalid_request_error").inc()
            _done(request, request.url.path, 413)
            return JSONResponse(body, status_code=413, headers={REQUEST_ID_HEADER: request_id})
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = request_id
        _count(request, response.status_code, metrics)
        return response


def _count(request: Request, status: int, metrics: GatewayMetrics) -> None:
    """Metrics and the access-log line of an API request (not /metrics, /health)."""
    route = request.scope.get("route")
    endpoint = getattr(route, "path", OTHER)
    if endpoint.startswith("/v1/"):
        model = getattr(request.state, "model", None)
        metrics.requests.labels(metrics.model_label(model), endpoint, str(status)).inc()
        _done(request, endpoint, status, model)


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

    @app.exception_handler(KvmeshError)
    async def kvmesh_error(request: Request, exc: KvmeshError) -> JSONResponse:
        return error_response(exc, getattr(request.state, "request_id", None), metrics)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def grpc_error(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        return error_response(exc, getattr(request.state, "request_id", None), metrics)
