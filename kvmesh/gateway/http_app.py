"""The OpenAI-compatible HTTP API (FastAPI)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from kvmesh.core.error_map import http_error_for, http_error_of, openai_error_body
from kvmesh.core.errors import AuthenticationError, KvmeshError, RateLimitedError
from kvmesh.core.logs import request_id_var
from kvmesh.core.tracing import current_trace_id
from kvmesh.gateway.admission import ANONYMOUS, Slot
from kvmesh.gateway.body_limit import ChunkedBodyLimit
from kvmesh.gateway.chat import (
    ChatChoiceEvent,
    ChatChoiceResult,
    ChatPlan,
    collect_chat,
    stream_chat,
)
from kvmesh.gateway.core import GatewayCore, new_request_id
from kvmesh.gateway.discovery import prometheus_targets
from kvmesh.gateway.embeddings import encode_embedding
from kvmesh.gateway.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from kvmesh.gateway.metrics import OTHER, GatewayMetrics
from kvmesh.gateway.pipeline import (
    ChoiceDelta,
    Finished,
    echo_texts,
    run_generation,
    run_prompts,
)
from kvmesh.gateway.request_log import RequestRecord
from kvmesh.gateway.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    Usage,
)
from kvmesh.gateway.tokenizers import ModelTokenizer

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
        param = dict(exc.trailing_metadata() or ()).get("kvmesh-error-param")
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


def _without_nulls(value: Any) -> Any:
    """A chat delta as vLLM sends it: unset fields left out, nested ones too (the openai
    SDK's stream accumulator takes a tool call's `"type": null` as a new type)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _without_null_usage(payload: dict[str, Any]) -> dict[str, Any]:
    if payload.get("usage") is None:
        payload.pop("usage", None)
    return payload


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


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def create_app(core: GatewayCore) -> FastAPI:
    app = FastAPI(title="kvmesh gateway", version="0.1.0")
    app.add_middleware(ChunkedBodyLimit, max_body_bytes=core.config.max_body_bytes)
    metrics = core.metrics
    app.state.metrics = metrics

    def count_request(request: Request, status: int) -> None:
        """Metrics and the access-log line of an API request (not /metrics, /health)."""
        route = request.scope.get("route")
        endpoint = getattr(route, "path", OTHER)
        if endpoint.startswith("/v1/"):
            model = getattr(request.state, "model", None)
            metrics.requests.labels(metrics.model_label(model), endpoint, str(status)).inc()
            record: RequestRecord = request.state.record
            record.endpoint, record.model, record.status = endpoint, model or "", status
            record.done()

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
                record = request.state.record
                record.endpoint, record.status = request.url.path, 401
                record.done()
                return error_response(exc, request_id, metrics)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > core.config.max_body_bytes:
            body = openai_error_body(
                f"request body of {length} bytes exceeds the limit of "
                f"{core.config.max_body_bytes}", "invalid_request_error", code=413,
            )
            metrics.errors.labels("invalid_request_error").inc()
            record = request.state.record
            record.endpoint, record.status = request.url.path, 413
            record.done()
            return JSONResponse(body, status_code=413, headers={REQUEST_ID_HEADER: request_id})
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = request_id
        count_request(request, response.status_code)
        return response

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

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/sd/prometheus")
    async def prometheus_sd(request: Request) -> JSONResponse:
        """Prometheus HTTP service discovery: gateway, router and every worker."""
        gateway = core.http_address or request.url.netloc
        return JSONResponse(prometheus_targets(
            gateway, core.catalog.router_metrics_endpoint, core.catalog.workers))

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = core.ready_models()
        status = 200 if ready else 503
        return JSONResponse({"status": "ok" if ready else "starting", "models": ready},
                            status_code=status)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=e.name, created=e.created, max_model_len=e.max_context_length)
                for e in core.catalog.all()
            ]
        )

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        e = core.catalog.get(model_id)
        return ModelCard(id=e.name, created=e.created, max_model_len=e.max_context_length)

    def admit(request: Request, stream: bool) -> Slot:
        return core.admission.admit(getattr(request.state, "key", ANONYMOUS), stream)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse | None:
        request.state.model = body.model
        spec, tokenizer, plan = await core.prepare_chat(body)
        rid = new_request_id("chatcmpl")
        created = int(time.time())
        slot = admit(request, body.stream)
        try:
            events = metrics.observe_generation(
                run_generation(core.mesh, tokenizer, spec, rid), body.model,
                "/v1/chat/completions", request.state.started, request.state.record)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                # Until the first token, nothing is written that would notice a client
                # gone mid-prefill: watch for the disconnect meanwhile.
                chat_events = await cancel_on_disconnect(
                    request, primed(stream_chat(events, plan, tokenizer, spec.n)))
                if chat_events is None:
                    slot.release()
                    return None
                return StreamingResponse(
                    _released(slot, _chat_stream(
                        chat_events, rid, created, body.model, spec.n, include_usage, plan,
                        tokenizer, metrics)),
                    media_type="text/event-stream",
                )

            async def collect() -> dict[str, Any]:
                results, final = await collect_chat(events, plan, tokenizer, spec.n)
                return _chat_response(rid, created, body.model, results, final, plan,
                                      tokenizer)

            result = await cancel_on_disconnect(request, collect())
        except BaseException:
            slot.release()
            raise
        slot.release()
        return None if result is None else JSONResponse(result)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse | None:
        request.state.model = body.model
        specs, tokenizer = await core.prepare_completion(body)
        rid = new_request_id("cmpl")
        created = int(time.time())
        n = body.n
        prefixes = echo_texts(specs, tokenizer) if body.echo else [""] * len(specs)
        slot = admit(request, body.stream)
        try:
            events = metrics.observe_generation(
                run_prompts(core.mesh, tokenizer, specs, rid),
                body.model, "/v1/completions", request.state.started, request.state.record)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                # Until the first token, nothing is written that would notice a client
                # gone mid-prefill: watch for the disconnect meanwhile.
                primed_events = await cancel_on_disconnect(request, primed(events))
                if primed_events is None:
                    slot.release()
                    return None
                return StreamingResponse(
                    _released(slot, _completion_stream(
                        primed_events, rid, created, body.model, prefixes, n, include_usage,
                        body.logprobs, tokenizer, metrics)),
                    media_type="text/event-stream",
                )

            async def collect() -> CompletionResponse:
                total = n * len(specs)
                texts, reasons, logprobs, prompt_logprobs, final = await _collect(events, total)
                choices = []
                for i in range(total):
                    prefix = prefixes[i // n]
                    lp = None
                    if body.logprobs is not None:
                        lp = _completion_logprobs(prompt_logprobs[i], logprobs[i],
                                                  body.logprobs, tokenizer, len(prefix))
                    choices.append(CompletionChoice(
                        index=i, text=prefix + texts[i], finish_reason=reasons[i], logprobs=lp))
                return CompletionResponse(
                    id=rid, created=created, model=body.model, usage=final, choices=choices)

            result = await cancel_on_disconnect(request, collect())
        except BaseException:
            slot.release()
            raise
        slot.release()
        return None if result is None else JSONResponse(result.model_dump())

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse | None:
        rid = new_request_id("embd")
        created = int(time.time())
        result = await cancel_on_disconnect(request, core.embed(body, rid))
        if result is None:
            return None
        response = EmbeddingResponse(
            id=rid, created=created, model=body.model,
            data=[
                EmbeddingData(index=i, embedding=encode_embedding(v, body.encoding_format))
                for i, v in enumerate(result.vectors)
            ],
            usage=EmbeddingUsage(
                prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens
            ),
        )
        return JSONResponse(response.model_dump())

    return app


async def _released(slot: Slot, frames: AsyncIterator[str]) -> AsyncIterator[str]:
    """A streaming body that gives back its admission slot however it ends (before
    the final [DONE], so a client that saw it may start its next stream at once)."""
    done = _sse("[DONE]")
    try:
        async with contextlib.aclosing(frames):  # type: ignore[type-var]
            async for frame in frames:
                if frame == done:
                    slot.release()
                yield frame
    finally:
        slot.release()


def _chat_response(
    rid: str, created: int, model: str, results: list[ChatChoiceResult], final: Usage,
    plan: ChatPlan, tokenizer: ModelTokenizer,
) -> dict[str, Any]:
    choices = []
    for r in results:
        lp = None
        if plan.top_logprobs is not None:
            lp = chat_logprobs(r.logprobs, plan.top_logprobs, tokenizer.token_text)
        message = ChatResponseMessage(
            content=r.content, reasoning=r.reasoning, reasoning_content=r.reasoning,
            tool_calls=r.tool_calls)
        choices.append(ChatChoice(index=r.index, message=message,
                                  finish_reason=r.finish_reason, logprobs=lp))
    payload = ChatCompletionResponse(
        id=rid, created=created, model=model, usage=final, choices=choices).model_dump()
    for choice in payload["choices"]:
        if not choice["message"]["tool_calls"]:
            del choice["message"]["tool_calls"]  # as vLLM: no empty list
        if choice["message"]["reasoning"] is None:
            del choice["message"]["reasoning_content"]
    return payload


def _completion_logprobs(
    prompt: list[TokenLogprob], generated: list[TokenLogprob], top_n: int,
    tokenizer: ModelTokenizer, start_offset: int,
) -> dict[str, Any]:
    """A completion choice's logprobs; with the echoed prompt's tokens first (their
    offsets then start at 0, where the echoed text starts)."""
    return completion_logprobs([*prompt, *generated], top_n, tokenizer.token_text,
                               0 if prompt else start_offset)


async def _collect(
    events: AsyncIterator[ChoiceDelta | Finished], n: int
) -> tuple[list[str], list[str | None], list[list[TokenLogprob]], list[list[TokenLogprob]],
           Usage]:
    texts = [""] * n
    reasons: list[str | None] = [None] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    final: Usage | None = None
    async for event in events:
        if isinstance(event, Finished):
            final = event.usage
        else:
            texts[event.index] += event.text
            logprobs[event.index].extend(event.logprobs)
            prompt_logprobs[event.index].extend(event.prompt_logprobs)
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
    assert final is not None  # run_generation always ends with Finished
    return texts, reasons, logprobs, prompt_logprobs, final


async def _stream_errors(
    events: AsyncIterator[str], metrics: GatewayMetrics | None = None
) -> AsyncIterator[str]:
    """Errors after the response started can only be reported in-band."""
    try:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for item in events:
                yield item
    except (KvmeshError, grpc.aio.AioRpcError) as exc:
        response = error_response(exc, metrics=metrics)
        yield _sse(json.loads(bytes(response.body)))
    yield _sse("[DONE]")


def _chat_stream(
    events: AsyncIterator[ChatChoiceEvent | Finished],
    rid: str, created: int, model: str, n: int, include_usage: bool, plan: ChatPlan,
    tokenizer: ModelTokenizer, metrics: GatewayMetrics | None = None,
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        payload = _without_null_usage(ChatCompletionChunk(
            id=rid, created=created, model=model, choices=choices, usage=usage
        ).model_dump())
        for choice in payload["choices"]:
            choice["delta"] = _without_nulls(choice["delta"])
        return _sse(payload)

    async def frames() -> AsyncIterator[str]:
        for i in range(n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, Finished):
                    if include_usage:
                        yield chunk([], event.usage)
                    continue
                lp = None
                if plan.top_logprobs is not None and event.logprobs:
                    lp = chat_logprobs(event.logprobs, plan.top_logprobs, tokenizer.token_text)
                yield chunk([ChatChunkChoice(
                    index=event.index,
                    delta=ChatDelta(
                        content=event.content or None,
                        reasoning=event.reasoning or None,
                        reasoning_content=event.reasoning or None,
                        tool_calls=event.tool_calls or None,
                    ),
                    finish_reason=event.finish_reason,
                    logprobs=lp,
                )])

    return _stream_errors(frames(), metrics)


def _completion_stream(
    events: AsyncIterator[ChoiceDelta | Finished],
    rid: str, created: int, model: str, prefixes: list[str], n: int, include_usage: bool,
    logprobs: int | None, tokenizer: ModelTokenizer, metrics: GatewayMetrics | None = None,
) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _sse(_without_null_usage(CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage
        ).model_dump()))

    async def frames() -> AsyncIterator[str]:
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, Finished):
                    if include_usage:
                        yield chunk([], event.usage)
                    continue
                text = event.text
                prefix = prefixes[event.index // n]
                if prefix and event.index not in echoed:
                    echoed.add(event.index)
                    text = prefix + text
                lp = None
                if logprobs is not None and (event.logprobs or event.prompt_logprobs):
                    start = offsets.get(event.index, len(prefix))
                    lp = _completion_logprobs(event.prompt_logprobs, event.logprobs, logprobs,
                                              tokenizer, start)
                    offsets[event.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                if text or event.finish_reason or lp:
                    yield chunk([CompletionChoice(
                        index=event.index, text=text, finish_reason=event.finish_reason,
                        logprobs=lp,
                    )])

    return _stream_errors(frames(), metrics)
