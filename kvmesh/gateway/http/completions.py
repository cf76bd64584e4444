"""POST /v1/completions (text or token-id prompts, batches, echo, logprobs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kvmesh.gateway.http.chunk_json import CompletionChunkTemplate
from kvmesh.gateway.http.generation import Renderer, core_of, serve_generation
from kvmesh.gateway.http.streaming import (
    event_frames,
    sse,
    with_stream_errors,
    without_null_usage,
)
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


def completion_renderer(prepared: Prepared, rid: str, created: int, include_usage: bool,
                        request: Request) -> Renderer[Event]:
    n, model, tokenizer = prepared.n, prepared.model, prepared.tokenizer
    prefixes, logprobs = prepared.echoes, prepared.logprobs
    metrics = core_of(request).metrics
    plain = CompletionChunkTemplate(rid, created, model)

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(without_null_usage(CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage
        ).model_dump()))

    echoed: set[int] = set()
    offsets: dict[int, int] = {}

    def frame(event: ChoiceDelta) -> str | None:
        text = event.text
        prefix = prefixes[event.index // n]
        if prefix and event.index not in echoed:
            echoed.add(event.index)
            text = prefix + text
        lp = None
        if logprobs is not None and (event.logprobs or event.prompt_logprobs):
            start = offsets.get(event.index, len(prefix))
            lp = _logprobs(event.prompt_logprobs, event.logprobs, logprobs, tokenizer, start)
            offsets[event.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        if not (text or event.finish_reason or lp or event.token_ids):
            return None  # tokens with their text held back still go out, as vLLM sends
        if lp is None:
            return plain.text(event.index, text, event.finish_reason)
        return chunk([CompletionChoice(index=event.index, text=text,
                                       finish_reason=event.finish_reason, logprobs=lp)])

    def frames(events: AsyncIterator[Event]) -> AsyncIterator[str]:
        return event_frames(events, frame, (lambda u: chunk([], u)) if include_usage else None)

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


router = APIRouter()
ENDPOINT = "/v1/completions"


@router.post(ENDPOINT, response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response | None:
    return await serve_generation(request, body, prepare_completion, "cmpl", ENDPOINT,
                                  completion_renderer)


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
