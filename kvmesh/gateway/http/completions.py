"""POST /v1/completions (text or token-id prompts, batches, echo, logprobs)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvmesh.gateway.http.generation import Renderer, core_of, respond
from kvmesh.gateway.http.streaming import sse, with_stream_errors, without_null_usage
from kvmesh.gateway.lifecycle import Event, Prepared, prepare_completion
from kvmesh.gateway.logprobs import TokenLogprob, completion_logprobs
from kvmesh.gateway.pipeline import ChoiceDelta, Finished
from kvmesh.gateway.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from kvmesh.gateway.tokenizers import ModelTokenizer

router = APIRouter()
ENDPOINT = "/v1/completions"


@router.post(ENDPOINT, response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> JSONResponse | StreamingResponse | None:
    request.state.model = body.model
    prepared = await prepare_completion(core_of(request), body)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(request, prepared, "cmpl", ENDPOINT,
                         lambda rid, created: completion_renderer(prepared, rid, created,
                                                                  include_usage, request))


def completion_renderer(prepared: Prepared, rid: str, created: int, include_usage: bool,
                        request: Request) -> Renderer[Event]:
    n, model, tokenizer = prepared.n, prepared.model, prepared.tokenizer
    prefixes, logprobs = prepared.echoes, prepared.logprobs
    metrics = core_of(request).metrics

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(without_null_usage(CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage
        ).model_dump()))

    async def frames(events: AsyncIterator[Event]) -> AsyncIterator[str]:
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
                    lp = _logprobs(event.prompt_logprobs, event.logprobs, logprobs,
                                   tokenizer, start)
                    offsets[event.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                if text or event.finish_reason or lp:
                    yield chunk([CompletionChoice(
                        index=event.index, text=text, finish_reason=event.finish_reason,
                        logprobs=lp,
                    )])

    async def collect(events: AsyncIterator[Event]) -> dict[str, Any]:
        total = n * len(prepared.specs)
        texts, reasons, logprob_lists, prompt_logprobs, final = await _collect(events, total)
        choices = []
        for i in range(total):
            prefix = prefixes[i // n]
            lp = None
            if logprobs is not None:
                lp = _logprobs(prompt_logprobs[i], logprob_lists[i], logprobs, tokenizer,
                               len(prefix))
            choices.append(CompletionChoice(
                index=i, text=prefix + texts[i], finish_reason=reasons[i], logprobs=lp))
        return CompletionResponse(
            id=rid, created=created, model=model, usage=final, choices=choices).model_dump()

    return Renderer(stream_events=lambda events: events,
                    frames=lambda events: with_stream_errors(frames(events), metrics),
                    collect=collect)


def _logprobs(
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
