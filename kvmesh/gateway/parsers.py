"""vLLM's tool-call and reasoning parsers, run on the gateway over generated text.

The parsers live in vLLM (``vllm.tool_parsers``, ``vllm.reasoning``). Importing them
starts no engine, but it does import torch (~8 s of CPU once, measured on this
machine), so the gateway imports them lazily, in a worker thread, the first time a
request needs one; requests without tools or reasoning never pay for it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmesh.core.errors import InvalidRequestError, KvmeshError
from kvmesh.core.service_main import freezing_imports
from kvmesh.gateway.schemas import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from kvmesh.gateway.tools import template_tools, tool_call_id


def _registered(lookup: Callable[[str], Any], name: str, what: str) -> Any:
    """A parser class from one of vLLM's registries, or a 400 naming the bad name."""
    try:
        return lookup(name)
    except KeyError as exc:
        raise InvalidRequestError(f"unknown {what} {name!r}") from exc


@functools.cache
def tool_parser_class(name: str) -> Any:
    from vllm.tool_parsers import ToolParserManager

    return _registered(ToolParserManager.get_tool_parser, name, "tool-call parser")


@functools.cache
def reasoning_parser_class(name: str) -> Any:
    from vllm.reasoning import ReasoningParserManager

    return _registered(ReasoningParserManager.get_reasoning_parser, name, "reasoning parser")


@functools.cache
def _vllm_chat_request_class() -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest


@functools.cache
def _required_call_scanner() -> Any:
    from vllm.tool_parsers.streaming import extract_required_tool_call_streaming

    return extract_required_tool_call_streaming


async def load_parsers(tool_parser: str | None, reasoning_parser: str | None,
                       required_calls: bool = False) -> None:
    """Import what a request needs without blocking the event loop (``required_calls``:
    vLLM's streaming scanner for a required tool choice)."""
    def load() -> None:
        with freezing_imports():  # vLLM and torch: out of the collector's walks
            if tool_parser:
                tool_parser_class(tool_parser)
                _vllm_chat_request_class()
            if reasoning_parser:
                reasoning_parser_class(reasoning_parser)
            if required_calls:
                _required_call_scanner()
    await asyncio.to_thread(load)


@dataclass
class ParsedDelta:
    """What one step of generated text means to the client."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def empty(self) -> bool:
        return not self.content and not self.reasoning and not self.tool_calls


def _delta_tool_calls(calls: Sequence[Any]) -> list[DeltaToolCall]:
    out = []
    for call in calls:
        fn = call.function
        out.append(DeltaToolCall(
            index=call.index, id=call.id, type="function" if call.id else None,
            function=None if fn is None else DeltaFunctionCall(
                name=fn.name, arguments=fn.arguments),
        ))
    return out


class RequiredToolStream:
    """Streams a ``tool_choice="required"`` choice's calls as vLLM's server does, with
    vLLM's own scanner over the constrained JSON array: a call's first delta carries
    its id, name and the arguments text so far, later ones only new arguments text."""

    def __init__(self) -> None:
        self._scan = _required_call_scanner()
        self._text = ""

    def add(self, delta: str) -> list[DeltaToolCall]:
        previous, self._text = self._text, self._text + delta
        message, _ = self._scan(previous_text=previous, current_text=self._text,
                                tool_call_idx=None, tool_call_id_type="random")
        return [] if message is None else _delta_tool_calls(message.tool_calls)

    def finish(self) -> list[DeltaToolCall]:
        return []  # every argument character was streamed as it came


class OutputParser:
    """One choice's reasoning + tool-call parsing, streamed or at the end.

    Text passes through the reasoning parser first (if any); what it calls content
    then goes through the tool parser (if tools are in "auto" mode), as in vLLM.
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        req: ChatCompletionRequest,
        tool_parser: str | None,
        reasoning_parser: str | None,
    ) -> None:
        self._vreq: Any = None
        self._tools: Any = None
        self._reasoning: Any = None
        if reasoning_parser:
            try:
                self._reasoning = reasoning_parser_class(reasoning_parser)(hf_tokenizer)
            except (RuntimeError, ValueError) as exc:  # e.g. no <think> tokens in the vocab
                raise KvmeshError(
                    f"reasoning parser {reasoning_parser!r} cannot run with the tokenizer of "
                    f"{req.model!r}: {exc}") from exc
        if tool_parser:
            self._vreq = _vllm_chat_request_class().model_validate({
                "model": req.model,
                "messages": [{"role": "user", "content": ""}],
                "tools": template_tools(req),
                "tool_choice": "auto",
            })
            try:
                self._tools = tool_parser_class(tool_parser)(
                    hf_tokenizer, tools=self._vreq.tools)
            except (RuntimeError, ValueError) as exc:
                raise KvmeshError(
                    f"tool-call parser {tool_parser!r} cannot run with the tokenizer of "
                    f"{req.model!r}: {exc}") from exc
        self._text = ""
        self._ids: list[int] = []
        self._reasoning_done = self._reasoning is None
        self._content_text = ""
        self._content_ids: list[int] = []
        self.tools_called = False

    def final(self, text: str) -> tuple[str | None, str | None, list[ToolCall]]:
        """Non-streaming: (reasoning, content, tool calls) of the whole output."""
        reasoning: str | None = None
        content: str | None = text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.extract_reasoning(text, self._vreq)
        calls: list[ToolCall] = []
        if self._tools is not None and content:
            info = self._tools.extract_tool_calls(content, self._vreq)
            if info.tools_called:
                self.tools_called = True
                calls = [ToolCall(id=c.id or tool_call_id(), function=FunctionCall(
                    name=c.function.name, arguments=c.function.arguments))
                    for c in info.tool_calls]
                content = info.content
        return reasoning, content, calls

    def step(self, delta_text: str, delta_ids: Sequence[int]) -> ParsedDelta:
        """Streaming: one delta of text (and the tokens that produced it)."""
        prev_text, prev_ids = self._text, list(self._ids)
        self._text += delta_text
        self._ids.extend(delta_ids)
        out = ParsedDelta(content=delta_text)
        if self._reasoning is not None:
            msg = self._reasoning.extract_reasoning_streaming(
                prev_text, self._text, delta_text, prev_ids, self._ids, list(delta_ids))
            out = ParsedDelta(reasoning=getattr(msg, "reasoning", None),
                              content=getattr(msg, "content", None))
        if self._tools is None or not out.content:
            return out
        content = out.content
        prev_c, prev_cids = self._content_text, list(self._content_ids)
        self._content_text += content
        self._content_ids.extend(delta_ids)
        msg = self._tools.extract_tool_calls_streaming(
            prev_c, self._content_text, content, prev_cids, self._content_ids,
            list(delta_ids), self._vreq)
        out.content = None if msg is None else msg.content
        if msg is not None and msg.tool_calls:
            self.tools_called = True
            out.tool_calls = _delta_tool_calls(msg.tool_calls)
        return out

    def finish(self) -> list[DeltaToolCall]:
        """Arguments the tool parser parsed but has not streamed yet."""
        if self._tools is None or not self.tools_called:
            return []
        rest = self._tools.get_remaining_unstreamed_args()
        if not rest:
            return []
        index = len(self._tools.prev_tool_call_arr) - 1
        return [DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=rest))]
