"""Structured output, tool calls, logprobs, n and batches: the unmodified openai SDK
against `kvmesh up` with real vLLM on CPU (constraints are enforced by the workers).

Shares the session's mesh with test_up_openai.py (which stops it last).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(kvmesh_up: UpProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=kvmesh_up.state["http"], api_key="unused", max_retries=0)


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, max_tokens=60, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_response_format_json_schema_streaming(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, max_tokens=60, temperature=0.8, seed=3,
        stream=True,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON}},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_response_format_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, max_tokens=60, temperature=0,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_guided_choice_regex_and_grammar_extras(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Is the sky blue?"}]
    choice = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=10, temperature=1.0, seed=1,
        extra_body={"guided_choice": ["maybe", "certainly not"]},
    )
    assert choice.choices[0].message.content in ("maybe", "certainly not")
    regex = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=20, temperature=1.0, seed=2,
        extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{4}"},
    )
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{4}", regex.choices[0].message.content)
    grammar = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=20, temperature=1.0, seed=3,
        extra_body={"guided_grammar": 'root ::= "sky is " color\ncolor ::= "teal" | "grey"'},
    )
    assert grammar.choices[0].message.content in ("sky is teal", "sky is grey")
    # vLLM 0.32's own name for the same thing, on /v1/completions too.
    completion = client.completions.create(
        model=MODEL, prompt="The answer is", max_tokens=10, temperature=1.0, seed=4,
        extra_body={"structured_outputs": {"choice": ["alpha", "omega"]}},
    )
    assert completion.choices[0].text in ("alpha", "omega")


def test_two_constraints_are_a_400_with_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=ASK_PERSON, max_tokens=5,
            response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"},
        )
    assert err.value.body["param"] == "guided_regex"


def test_named_tool_choice_is_guaranteed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, max_tokens=40, temperature=0,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments),
                        WEATHER_TOOL["function"]["parameters"])
    assert reply.choices[0].finish_reason == "stop"  # OpenAI/vLLM: named → "stop"


def test_required_tool_choice_streams_tool_calls(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, max_tokens=80, temperature=0,
                  tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    reply = client.chat.completions.create(**kwargs)
    calls = reply.choices[0].message.tool_calls
    assert calls and reply.choices[0].finish_reason == "tool_calls"
    tools = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments),
                            tools[call.function.name]["function"]["parameters"])
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed: dict[int, dict[str, str]] = {}
    pieces: dict[int, int] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = streamed.setdefault(d.index, {"name": "", "arguments": "", "id": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
            entry["id"] += d.id or ""
            pieces[d.index] = pieces.get(d.index, 0) + bool(d.function.arguments)
    assert [(e["name"], json.loads(e["arguments"])) for e in streamed.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert all(e["id"].startswith("chatcmpl-tool-") for e in streamed.values())
    # Incremental, as vLLM streams them: each call's arguments arrive in several deltas.
    assert all(n > 1 for n in pieces.values()), pieces
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The openai SDK's own accumulation of the stream gives the same calls.
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in final.choices[0].message.tool_calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls]


HERMES_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Lyon)"\}\}\n</tool_call>'  # noqa: E501


def test_auto_tool_choice_parses_with_vllm_hermes_parser(client: openai.OpenAI) -> None:
    # SmolLM2 was not trained for tools, so a regex makes it emit a Hermes-style call;
    # the gateway's vLLM tool parser (auto mode) must turn it into a tool call.
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, max_tokens=60, temperature=0,
                  tools=[WEATHER_TOOL], extra_body={"guided_regex": HERMES_CALL})
    reply = client.chat.completions.create(**kwargs)
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Lyon")
    assert reply.choices[0].finish_reason == "tool_calls"
    assert not reply.choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    name = "".join(d.function.name or "" for c in chunks if c.choices
                   for d in c.choices[0].delta.tool_calls or [])
    args = "".join(d.function.arguments or "" for c in chunks if c.choices
                   for d in c.choices[0].delta.tool_calls or [])
    assert name == "get_weather" and json.loads(args) == json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice="none": the same text stays content.
    plain = client.chat.completions.create(**kwargs, tool_choice="none")
    assert not plain.choices[0].message.tool_calls
    assert "<tool_call>" in plain.choices[0].message.content


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=20, temperature=0, tools=[WEATHER_TOOL],
        messages=[*ASK_WEATHER,
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}],
    )
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 20


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content).strip() == reply.choices[0].message.content.strip()
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
        assert t.bytes == list(t.token.encode())
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_completion_logprobs_n_and_batch(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt=["The capital of France is", "One, two, three,"],
        max_tokens=4, temperature=0.9, seed=5, n=2, logprobs=2,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.completion_tokens == sum(
        len(c.logprobs.tokens) for c in reply.choices)
    for c in reply.choices:
        lp = c.logprobs
        assert "".join(lp.tokens) == c.text
        assert lp.text_offset[0] == 0 and len(lp.token_logprobs) == len(lp.tokens)
        assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    single = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0)
    batch = client.completions.create(
        model=MODEL, prompt=["The capital of France is", "One, two, three,"], max_tokens=4,
        temperature=0)
    assert batch.choices[1].text == single.choices[0].text
    assert batch.usage.prompt_tokens > single.usage.prompt_tokens


def test_completion_echo_logprobs_cover_the_prompt(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                      temperature=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    # Each map: the token itself and the top alternative (one entry when they agree).
    assert all(tok in top and 1 <= len(top) <= 2
               for tok, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                            temperature=0, echo=True, logprobs=1,
                                            stream=True))
    assert [t for c in chunks if c.choices[0].logprobs
            for t in c.choices[0].logprobs.tokens] == lp.tokens


def test_logit_bias_forces_and_forbids_tokens(client: openai.OpenAI, model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = "The capital of France is"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                       temperature=0)
    first = tok.encode(greedy.choices[0].text, add_special_tokens=False)
    assert len(first) == 1  # one token, re-encoded to its id
    forbidden = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                          temperature=0, logit_bias={str(first[0]): -100})
    assert forbidden.choices[0].text != greedy.choices[0].text
    banana = tok.encode(" banana", add_special_tokens=False)[0]
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                       temperature=0, logit_bias={str(banana): 100})
    assert forced.choices[0].text == tok.decode([banana] * 3)
    chat = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=2,
                                          temperature=0, logit_bias={str(banana): 100})
    assert chat.choices[0].message.content == tok.decode([banana] * 2)


def test_grpc_inference_structured_output_tools_and_logprobs(kvmesh_up: UpProcess) -> None:
    import asyncio

    import grpc

    from kvmesh.v1 import inference_pb2 as pb
    from kvmesh.v1 import inference_pb2_grpc

    async def run() -> None:
        async with grpc.aio.insecure_channel(kvmesh_up.state["grpc"]) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            sampling = pb.SamplingOptions(max_tokens=60, temperature=0)
            person = [r async for r in stub.Chat(pb.ChatRequest(
                model=MODEL, sampling=sampling,
                messages=[pb.ChatMessage(role="user", content=ASK_PERSON[0]["content"])],
                structured_output=pb.StructuredOutput(json_schema=json.dumps(PERSON))))]
            jsonschema.validate(json.loads(person[-1].choices[0].text), PERSON)
            weather = pb.Tool(name="get_weather",
                              parameters_json=json.dumps(WEATHER_TOOL["function"]["parameters"]))
            request = pb.ChatRequest(
                model=MODEL, sampling=sampling, tools=[weather], stream=True,
                messages=[pb.ChatMessage(role="user", content=ASK_WEATHER[0]["content"])],
                tool_choice=pb.ToolChoice(function="get_weather"), top_logprobs=2)
            deltas = [c async for r in stub.Chat(request) for c in r.choices]
            calls = [t for c in deltas for t in c.tool_calls]
            assert calls[0].name == "get_weather" and calls[0].id
            args = json.loads("".join(t.arguments for t in calls))
            jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
            logprobs = [lp for c in deltas for lp in c.logprobs]
            assert logprobs and all(len(lp.top_logprobs) == 2 for lp in logprobs)
            completion = [r async for r in stub.Complete(pb.CompletionRequest(
                model=MODEL, text="The answer is", sampling=pb.SamplingOptions(max_tokens=5),
                structured_output=pb.StructuredOutput(
                    choice=pb.ChoiceList(choices=["alpha", "omega"]))))]
            assert completion[-1].choices[0].text in ("alpha", "omega")

    asyncio.run(run())
