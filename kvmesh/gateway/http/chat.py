"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kvmesh.gateway.chat import ChatChoiceEvent, ChatChoiceResult, collect_chat, stream_chat
from kvmesh.gateway.http.chunk_json import ChatChunkTemplate
from kvmesh.gateway.http.generation import Renderer, core_of, serve_generation
from kvmesh.gateway.http.streaming import (
    event_frames,
    sse,
    with_stream_errors,
    without_null_usage,
)
from kvmesh.gateway.lifecycle import Event, Prepared, prepare_chat
from kvmesh.gateway.logprobs import chat_logprobs
from kvmesh.gateway.pipeline import Finished
from kvmesh.gateway.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    Usage,
)


def chat_renderer(prepared: Prepared, rid: str, created: int, include_usage: bool,
                 request: Request) -> Renderer[ChatChoiceEvent | Finished]:
    plan, tokenizer, n, model = prepared.plan, prepared.tokenizer, prepared.n, prepared.model
    assert plan is not None  # a chat request always has its plan
    metrics = core_of(request).metrics
    plain = ChatChunkTemplate(rid, created, model)

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        payload = without_null_usage(ChatCompletionChunk(
            id=rid, created=created, model=model, choices=choices, usage=usage
        ).model_dump())
        for choice in payload["choices"]:
            choice["delta"] = _without_nulls(choice["delta"])
        return sse(payload)

    def frame(event: ChatChoiceEvent) -> str:
        if not (event.reasoning or event.tool_calls or
                (plan.top_logprobs is not None and event.logprobs)):
            return plain.content(event.index, event.content or "", event.finish_reason)
        lp = None
        if plan.top_logprobs is not None and event.logprobs:
            lp = chat_logprobs(event.logprobs, plan.top_logprobs, tokenizer.token_text)
        return chunk([ChatChunkChoice(
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

    async def frames(events: AsyncIterator[ChatChoiceEvent | Finished]) -> AsyncIterator[str]:
        for i in range(n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        usage = (lambda u: chunk([], u)) if include_usage else None
        async for text in event_frames(events, frame, usage):
            yield text

    async def collect(events: AsyncIterator[Event]) -> dict[str, Any]:
        results, final = await collect_chat(events, plan, tokenizer, n)
        return _chat_response(rid, created, model, results, final, prepared)

    return Renderer(
        stream_events=lambda events: stream_chat(events, plan, tokenizer, n),
        frames=lambda events: with_stream_errors(frames(events), metrics),
        collect=collect,
    )


router = APIRouter()
ENDPOINT = "/v1/chat/completions"


@router.post(ENDPOINT, response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | None:
    return await serve_generation(request, body, prepare_chat, "chatcmpl", ENDPOINT, chat_renderer)


def _without_nulls(value: Any) -> Any:
    """A chat delta as vLLM sends it: unset fields left out, nested ones too (the openai
    SDK's stream accumulator takes a tool call's `"type": null` as a new type)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _chat_response(rid: str, created: int, model: str, results: list[ChatChoiceResult],
                   final: Usage, prepared: Prepared) -> dict[str, Any]:
    plan, tokenizer = prepared.plan, prepared.tokenizer
    choices = []
    for r in results:
        lp = None
        if plan is not None and plan.top_logprobs is not None:
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
