"""One generation through the mesh, as API-neutral events (HTTP and gRPC share it)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from smg_grpc_proto import vllm_engine_pb2

from kvmesh.core.errors import KvmeshError
from kvmesh.gateway.detokenize import TextAssembler
from kvmesh.gateway.logprobs import TokenLogprob
from kvmesh.gateway.mesh import MeshClient
from kvmesh.gateway.schemas import Usage
from kvmesh.gateway.tokenizers import ModelTokenizer
from kvmesh.gateway.translate import GenerationSpec, finish_reason, usage

tracer = trace.get_tracer(__name__)


@dataclass
class DetokenizeTiming:
    """Incremental detokenization is spread over the stream; it becomes one span
    from its first to its last piece, carrying the time actually spent."""

    first_ns: int = 0
    last_ns: int = 0
    busy_ns: int = 0
    tokens: int = 0

    def add(self, started_ns: int, tokens: int) -> None:
        now = time.time_ns()
        self.first_ns = self.first_ns or started_ns
        self.last_ns = now
        self.busy_ns += now - started_ns
        self.tokens += tokens

    def record(self, parent: otel_context.Context) -> None:
        if not self.first_ns:
            return
        span = tracer.start_span("detokenize", context=parent, start_time=self.first_ns,
                                 attributes={"kvmesh.detokenize.busy_ms": self.busy_ns / 1e6,
                                             "kvmesh.detokenize.tokens": self.tokens})
        span.end(end_time=self.last_ns)


@dataclass
class ChoiceDelta:
    """New text for one choice; ``finish_reason`` set on its last delta.

    A choice's first delta carries the prompt's logprobs when they were asked for
    (``SamplingParams.prompt_logprobs``: completions with ``echo`` and ``logprobs``).
    """

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


def _top(tops: list[vllm_engine_pb2.TopLogProbs], i: int) -> tuple[tuple[int, float], ...]:
    return tuple(zip(tops[i].token_ids, tops[i].values, strict=False)) if i < len(tops) else ()


def _logprobs(chunk: vllm_engine_pb2.GenerateStreamChunk) -> list[TokenLogprob]:
    if not chunk.HasField("output_logprobs"):
        return []
    lp = chunk.output_logprobs
    tops = list(lp.top_logprobs)
    return [
        TokenLogprob(token_id, value, _top(tops, i))
        for i, (token_id, value) in enumerate(zip(lp.token_ids, lp.token_logprobs, strict=False))
    ]


def _prompt_logprobs(
    chunk: vllm_engine_pb2.GenerateStreamChunk | vllm_engine_pb2.GenerateComplete,
) -> list[TokenLogprob]:
    """The worker's prompt logprobs (in its first chunk per choice, or a non-streamed
    Complete); the first prompt token's value is unset."""
    if not chunk.HasField("input_logprobs"):
        return []
    lp = chunk.input_logprobs
    tops = list(lp.top_logprobs)
    return [
        TokenLogprob(token_id, value.value if value.HasField("value") else None,
                     _top(tops, i))
        for i, (token_id, value) in enumerate(zip(lp.token_ids, lp.token_logprobs, strict=False))
    ]


@dataclass
class Finished:
    usage: Usage


async def run_generation(
    mesh: MeshClient, tokenizer: ModelTokenizer, spec: GenerationSpec, request_id: str
) -> AsyncIterator[ChoiceDelta | Finished]:
    assemblers = [TextAssembler(tokenizer.backend, spec.stop) for _ in range(spec.n)]
    done: set[int] = set()
    # The prompt is the same for every choice; each choice's first delta gets it.
    prompt_logprobs: list[TokenLogprob] = []
    started: set[int] = set()

    def first_delta(delta: ChoiceDelta) -> ChoiceDelta:
        if delta.index not in started:
            started.add(delta.index)
            delta.prompt_logprobs = prompt_logprobs
        return delta

    prompt_tokens = len(spec.prompt_ids)
    cached_tokens = 0
    parent = otel_context.get_current()
    detok = DetokenizeTiming()
    stream = mesh.generate(
        request_id, spec.model, spec.prompt_ids, spec.sampling, spec.prompt_text,
        mm_inputs=spec.mm_inputs, adapter=spec.adapter,
    )
    async with contextlib.aclosing(stream):
        async for response in stream:
            kind = response.WhichOneof("response")
            if kind == "chunk":
                chunk = response.chunk
                cached_tokens = max(cached_tokens, chunk.cached_tokens)
                prompt_logprobs = prompt_logprobs or _prompt_logprobs(chunk)
                if chunk.index in done:
                    continue
                assembler = assemblers[chunk.index]
                t0 = time.time_ns()
                text = assembler.add(chunk.token_ids)
                detok.add(t0, len(chunk.token_ids))
                logprobs = _logprobs(chunk)
                if assembler.stopped_by is not None:
                    done.add(chunk.index)
                    yield first_delta(ChoiceDelta(
                        chunk.index, text, list(chunk.token_ids), "stop", logprobs))
                elif text or chunk.token_ids:
                    yield first_delta(ChoiceDelta(
                        chunk.index, text, list(chunk.token_ids), None, logprobs))
            elif kind == "complete":
                complete = response.complete
                prompt_tokens = complete.prompt_tokens or prompt_tokens
                cached_tokens = max(cached_tokens, complete.cached_tokens)
                prompt_logprobs = prompt_logprobs or _prompt_logprobs(complete)
                if complete.index in done:
                    continue
                done.add(complete.index)
                assembler = assemblers[complete.index]
                # A streamed Complete repeats the last delta, already counted above.
                t0 = time.time_ns()
                text = assembler.finish()
                detok.add(t0, 0)
                reason = "stop" if assembler.stopped_by else finish_reason(complete.finish_reason)
                yield first_delta(ChoiceDelta(complete.index, text, [], reason))
    detok.record(parent)
    if len(done) != spec.n:
        raise KvmeshError(f"worker stream ended with {len(done)} of {spec.n} choices finished")
    completion_tokens = sum(len(a.token_ids) for a in assemblers)
    yield Finished(usage(prompt_tokens, completion_tokens, cached_tokens))


#: Events buffered between a batch's prompt streams and its one response stream.
MERGE_QUEUE_EVENTS = 16


def run_prompts(
    mesh: MeshClient, tokenizer: ModelTokenizer, specs: list[GenerationSpec], request_id: str
) -> AsyncIterator[ChoiceDelta | Finished]:
    """A batch of prompts (completions) as one generation: prompt i's choice j is
    choice i*n+j; each prompt runs as its own request (``<id>-<i>`` in a batch)."""
    return merge_generations(
        [run_generation(mesh, tokenizer, spec,
                        f"{request_id}-{i}" if len(specs) > 1 else request_id)
         for i, spec in enumerate(specs)], specs[0].n)


def echo_texts(specs: list[GenerationSpec], tokenizer: ModelTokenizer) -> list[str]:
    """What ``echo`` puts before each prompt's choices: the prompt as text."""
    return [spec.prompt_text or tokenizer.decode(spec.prompt_ids) for spec in specs]


async def merge_generations(
    streams: list[AsyncIterator[ChoiceDelta | Finished]], n: int
) -> AsyncIterator[ChoiceDelta | Finished]:
    """Several prompts' generations as one: prompt i's choice j becomes choice i*n+j,
    and one Finished carries the summed usage (a batch of prompts in /v1/completions)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):  # type: ignore[type-var]
            async for event in streams[0]:
                yield event
        return
    # Bounded: a slow reader holds the prompts' streams back (and, through gRPC flow
    # control, their workers) instead of letting events pile up here.
    queue: asyncio.Queue[tuple[int, ChoiceDelta | Finished | BaseException | None]] = (
        asyncio.Queue(maxsize=MERGE_QUEUE_EVENTS)
    )

    async def pump(i: int, stream: AsyncIterator[ChoiceDelta | Finished]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for event in stream:
                    await queue.put((i, event))
            await queue.put((i, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    totals = [0, 0, 0]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, Finished):
                u = item.usage
                cached = (u.prompt_tokens_details or {}).get("cached_tokens", 0)
                totals = [totals[0] + u.prompt_tokens, totals[1] + u.completion_tokens,
                          totals[2] + cached]
            else:
                item.index += i * n
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    yield Finished(usage(*totals))
