"""Chat output: generated text → content, reasoning, tool calls, logprobs.

Shared by the HTTP and gRPC APIs; sits on top of :func:`run_generation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvmesh.gateway.logprobs import TokenLogprob
from kvmesh.gateway.parsers import OutputParser, RequiredToolStream
from kvmesh.gateway.pipeline import ChoiceDelta, Finished
from kvmesh.gateway.schemas import ChatCompletionRequest, DeltaToolCall, ToolCall, Usage
from kvmesh.gateway.tokenizers import ModelTokenizer
from kvmesh.gateway.tools import NamedToolStream, forced_tool_calls


@dataclass(frozen=True)
class ChatPlan:
    """How one chat request's output is interpreted."""

    req: ChatCompletionRequest
    tool_mode: str  # none | auto | required | named
    tool_parser: str | None  # used only in auto mode
    reasoning_parser: str | None
    top_logprobs: int | None  # None: no logprobs requested

    @property
    def needs_parser(self) -> bool:
        return bool(self.reasoning_parser or (self.tool_mode == "auto" and self.tool_parser))

    @property
    def streams_required_calls(self) -> bool:
        """A streamed required tool choice: its calls stream through vLLM's scanner."""
        return self.tool_mode == "required" and self.req.stream

    def tool_stream(self) -> NamedToolStream | RequiredToolStream | None:
        """What streams a forced (named or required) choice's tool calls, if any."""
        if self.tool_mode == "named":
            return NamedToolStream(self.req)
        if self.tool_mode == "required":
            return RequiredToolStream()
        return None

    def output_parser(self, tokenizer: ModelTokenizer) -> OutputParser | None:
        if not self.needs_parser:
            return None
        return OutputParser(
            tokenizer.hf, self.req,
            self.tool_parser if self.tool_mode == "auto" else None, self.reasoning_parser,
        )


@dataclass
class ChatChoiceEvent:
    """One streamed step of one choice."""

    index: int
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ChatChoiceResult:
    """One whole choice (non-streaming)."""

    index: int
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None
    logprobs: list[TokenLogprob]


def _final_reason(plan: ChatPlan, engine_reason: str | None, called: bool) -> str | None:
    # As in vLLM/OpenAI: "tool_calls" for auto and required, "stop" for a named tool.
    if engine_reason == "stop" and called and plan.tool_mode in ("auto", "required"):
        return "tool_calls"
    return engine_reason


async def stream_chat(
    events: AsyncIterator[ChoiceDelta | Finished], plan: ChatPlan, tokenizer: ModelTokenizer,
    n: int,
) -> AsyncIterator[ChatChoiceEvent | Finished]:
    streams = [plan.tool_stream() for _ in range(n)]
    parsers = [plan.output_parser(tokenizer) for _ in range(n)]
    called = [False] * n
    started = False
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, Finished):
                yield event
                continue
            i = event.index
            out = ChatChoiceEvent(i, logprobs=event.logprobs)
            forced_stream, parser = streams[i], parsers[i]
            if forced_stream is not None:
                out.tool_calls = forced_stream.add(event.text)
                if event.finish_reason:
                    out.tool_calls += forced_stream.finish()
            elif parser is not None:
                step = parser.step(event.text, event.token_ids)
                out.content, out.reasoning, out.tool_calls = (
                    step.content, step.reasoning, step.tool_calls)
                if event.finish_reason:
                    out.tool_calls += parser.finish()
                called[i] = parser.tools_called
            else:
                out.content = event.text
            called[i] = called[i] or bool(out.tool_calls)
            out.finish_reason = _final_reason(plan, event.finish_reason, called[i])
            # New tokens whose text is held back (bytes of a character not yet whole)
            # still go out as an empty content delta when no parser holds text back
            # itself, as vLLM sends them — and the first one starts the stream in any
            # case: a client's first chunk (its time to first token) must not wait for
            # the first whole character.
            plain = forced_stream is None and parser is None
            held_back = bool(event.token_ids) and (plain or not started)
            if out.content or out.reasoning or out.tool_calls or out.finish_reason or held_back:
                started = True
                yield out


async def collect_chat(
    events: AsyncIterator[ChoiceDelta | Finished], plan: ChatPlan, tokenizer: ModelTokenizer,
    n: int,
) -> tuple[list[ChatChoiceResult], Usage]:
    texts = [""] * n
    reasons: list[str | None] = [None] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    final: Usage | None = None
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, Finished):
                final = event.usage
                continue
            texts[event.index] += event.text
            logprobs[event.index].extend(event.logprobs)
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
    assert final is not None  # run_generation always ends with Finished
    results = []
    for i in range(n):
        reasoning: str | None = None
        content: str | None = texts[i]
        calls: list[ToolCall] = []
        if plan.tool_mode in ("required", "named"):
            calls = forced_tool_calls(plan.tool_mode, plan.req, texts[i])
            content = "" if calls else texts[i]  # as vLLM: the text became the calls
        else:
            parser = plan.output_parser(tokenizer)
            if parser is not None:
                reasoning, content, calls = parser.final(texts[i])
        results.append(ChatChoiceResult(
            i, content, reasoning, calls, _final_reason(plan, reasons[i], bool(calls)),
            logprobs[i]))
    return results, final
