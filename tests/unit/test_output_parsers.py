"""vLLM's reasoning and tool parsers as the gateway drives them, over real token streams.

Imports vLLM's parser modules (torch, no engine): a few seconds once per session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers.decoders import DecodeStream

from kvmesh.gateway.chat import ChatPlan, collect_chat, stream_chat
from kvmesh.gateway.parsers import OutputParser
from kvmesh.gateway.pipeline import ChoiceDelta, Finished
from kvmesh.gateway.schemas import ChatCompletionRequest
from kvmesh.gateway.tokenizers import ModelTokenizer
from kvmesh.gateway.translate import usage

pytestmark = pytest.mark.unit
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
THOUGHT = "<think>The user wants weather. I should call the tool.</think>"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> ModelTokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    # SmolLM2 has no thinking tokens; a reasoning model's tokenizer does.
    hf.add_tokens(["<think>", "</think>"])
    return ModelTokenizer(hf)


def chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def token_deltas(tok: ModelTokenizer, text: str) -> list[tuple[str, list[int]]]:
    """(text, [token]) per token, decoded incrementally as the gateway does."""
    stream = DecodeStream(skip_special_tokens=True)
    out = []
    for token in tok.encode(text, False):
        out.append((stream.step(tok.backend, token) or "", [token]))
    return out


def test_reasoning_split_whole_and_streamed(tokenizer: ModelTokenizer) -> None:
    text = THOUGHT + "It is sunny in Paris."
    parser = OutputParser(tokenizer.hf, chat(), None, "deepseek_r1")
    reasoning, content, calls = parser.final(text)
    assert reasoning == "The user wants weather. I should call the tool."
    assert content == "It is sunny in Paris." and calls == []
    parser = OutputParser(tokenizer.hf, chat(), None, "deepseek_r1")
    steps = [parser.step(t, ids) for t, ids in token_deltas(tokenizer, text)]
    assert "".join(s.reasoning or "" for s in steps) == reasoning
    assert "".join(s.content or "" for s in steps) == content


def test_hermes_tool_calls_whole_and_streamed(tokenizer: ModelTokenizer) -> None:
    req = chat(tools=[WEATHER])
    parser = OutputParser(tokenizer.hf, req, "hermes", None)
    reasoning, content, calls = parser.final("Let me check. " + CALL)
    assert reasoning is None and content == "Let me check. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    parser = OutputParser(tokenizer.hf, req, "hermes", None)
    steps = [parser.step(t, ids) for t, ids in token_deltas(tokenizer, CALL)]
    steps_calls = [c for s in steps for c in s.tool_calls] + parser.finish()
    assert parser.tools_called
    assert "".join(c.function.name or "" for c in steps_calls if c.function) == "get_weather"
    args = "".join(c.function.arguments or "" for c in steps_calls if c.function)
    assert json.loads(args) == {"city": "Paris"}
    assert not "".join(s.content or "" for s in steps).strip()


async def _events(tok: ModelTokenizer, text: str) -> Any:
    deltas = token_deltas(tok, text)
    for i, (t, ids) in enumerate(deltas):
        yield ChoiceDelta(0, t, ids, "stop" if i == len(deltas) - 1 else None)
    yield Finished(usage(5, len(deltas), 0))


def _plan(req: ChatCompletionRequest, reasoning: str | None) -> ChatPlan:
    return ChatPlan(req=req, tool_mode="auto" if req.tools else "none", tool_parser="hermes",
                    reasoning_parser=reasoning, top_logprobs=None)


async def test_reasoning_then_tool_call_through_the_chat_layer(
    tokenizer: ModelTokenizer,
) -> None:
    req = chat(tools=[WEATHER])
    plan = _plan(req, "deepseek_r1")
    [result], final = await collect_chat(_events(tokenizer, THOUGHT + CALL), plan, tokenizer, 1)
    assert result.reasoning and "call the tool" in result.reasoning
    assert [c.function.name for c in result.tool_calls] == ["get_weather"]
    assert result.finish_reason == "tool_calls" and final.prompt_tokens == 5
    events = [e async for e in stream_chat(_events(tokenizer, THOUGHT + CALL), plan,
                                           tokenizer, 1)]
    steps = [e for e in events if not isinstance(e, Finished)]
    assert "".join(e.reasoning or "" for e in steps) == result.reasoning
    assert steps[-1].finish_reason == "tool_calls"
    args = "".join(c.function.arguments or "" for e in steps for c in e.tool_calls
                   if c.function)
    assert json.loads(args) == {"city": "Paris"}


async def test_required_tool_calls_stream_incrementally(tokenizer: ModelTokenizer) -> None:
    ping = {"type": "function", "function": {"name": "ping"}}
    req = chat(tools=[WEATHER, ping], tool_choice="required", stream=True)
    plan = ChatPlan(req=req, tool_mode="required", tool_parser="hermes",
                    reasoning_parser=None, top_logprobs=None)
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris, France"}}, '
            '{"name": "ping", "parameters": {}}]')
    [whole], _ = await collect_chat(_events(tokenizer, text), plan, tokenizer, 1)
    events = [e async for e in stream_chat(_events(tokenizer, text), plan, tokenizer, 1)]
    deltas = [c for e in events if not isinstance(e, Finished) for c in e.tool_calls]
    # As vLLM streams them: id, type and name once per call, then arguments pieces.
    heads = [d for d in deltas if d.id]
    assert [(d.index, d.type, d.function and d.function.name) for d in heads] == [
        (0, "function", "get_weather"), (1, "function", "ping")]
    assert len({d.id for d in heads}) == 2
    assert all(d.function and d.function.name is None for d in deltas if not d.id)
    weather_pieces = [d for d in deltas if d.index == 0 and d.function and d.function.arguments]
    assert len(weather_pieces) > 2  # arguments arrive as generated, not in one piece
    streamed = {i: "".join(d.function.arguments or "" for d in deltas
                           if d.index == i and d.function) for i in (0, 1)}
    assert [json.loads(streamed[i]) for i in (0, 1)] == \
        [json.loads(c.function.arguments) for c in whole.tool_calls]
    assert events[-2].finish_reason == "tool_calls"


async def test_without_parsers_text_is_content(tokenizer: ModelTokenizer) -> None:
    plan = _plan(chat(), None)
    [result], _ = await collect_chat(_events(tokenizer, THOUGHT + "x"), plan, tokenizer, 1)
    assert result.content == THOUGHT + "x" and result.reasoning is None
    assert result.finish_reason == "stop"


def test_a_parser_the_tokenizer_cannot_serve_is_a_clear_error(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from kvmesh.core.errors import KvmeshError

    plain = AutoTokenizer.from_pretrained(str(model_dir))  # no <think> tokens
    with pytest.raises(KvmeshError, match="reasoning parser 'deepseek_r1' cannot run"):
        OutputParser(plain, chat(), None, "deepseek_r1")


@pytest.mark.parametrize("reasoning", [None, "deepseek_r1"])
async def test_the_stream_starts_at_the_first_token_whose_text_is_held_back(
    tokenizer: ModelTokenizer, reasoning: str | None,
) -> None:
    """An answer that opens with a character of several byte tokens (its text held back
    until whole) still starts the stream at its first token: the first event (which
    starts the HTTP response and its role chunk) must not wait for a whole character —
    a generation that never forms one would otherwise send nothing until it ends (5 s
    TTFT on vLLM's own bench's random prompts). Without a parser, every token goes out
    as vLLM sends it, an empty content delta while its text is held back."""
    text = "😀🙂 ok"
    deltas = token_deltas(tokenizer, text)
    assert deltas[0] == ("", deltas[0][1])  # the first token is part of a character
    plan = _plan(chat(), reasoning)
    seen: list[int] = []

    async def events() -> Any:
        for i, (t, ids) in enumerate(deltas):
            seen.append(i)
            yield ChoiceDelta(0, t, ids, "stop" if i == len(deltas) - 1 else None)
        yield Finished(usage(5, len(deltas), 0))

    stream = aiter(stream_chat(events(), plan, tokenizer, 1))
    first = await anext(stream)
    assert seen == [0] and not first.content
    rest = [e async for e in stream if not isinstance(e, Finished)]
    said = "".join((e.content or "") + (e.reasoning or "") for e in [first, *rest])
    assert said == text  # (deepseek_r1 takes an answer without </think> as reasoning)
    if reasoning is None:
        assert 1 + len(rest) == len(deltas)  # one event per token, as vLLM streams
