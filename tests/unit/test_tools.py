import json

import jsonschema
import pytest

from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.schemas import ChatCompletionRequest
from kvmesh.gateway.tools import (
    NamedToolStream,
    forced_tool_calls,
    required_schema,
    template_message,
    tool_constraint,
    tool_mode,
)

pytestmark = pytest.mark.unit
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
NOARGS = {"type": "function", "function": {"name": "ping"}}


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_modes() -> None:
    assert tool_mode(chat()) == "none"
    assert tool_mode(chat(tools=[WEATHER])) == "auto"
    assert tool_mode(chat(tools=[WEATHER], tool_choice="none")) == "none"
    assert tool_mode(chat(tools=[WEATHER], tool_choice="required")) == "required"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert tool_mode(chat(tools=[WEATHER], tool_choice=named)) == "named"
    with pytest.raises(InvalidRequestError) as err:
        tool_mode(chat(tool_choice="required"))
    assert err.value.param == "tool_choice"


def test_auto_and_none_add_no_constraint() -> None:
    assert tool_constraint(chat(tools=[WEATHER])) is None
    assert tool_constraint(chat(tools=[WEATHER], tool_choice="none")) is None


def test_named_constraint_is_the_parameters_schema() -> None:
    c = tool_constraint(chat(tools=[WEATHER, NOARGS], tool_choice={
        "type": "function", "function": {"name": "ping"}}))
    assert c is not None and c.kind == "json_schema"
    assert json.loads(str(c.value)) == {"type": "object", "properties": {}}
    with pytest.raises(InvalidRequestError, match="has not been passed"):
        tool_constraint(chat(tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "nope"}}))


def test_required_schema_accepts_calls_and_rejects_others() -> None:
    req = chat(tools=[WEATHER, NOARGS], tool_choice="required")
    c = tool_constraint(req)
    assert c is not None
    schema = json.loads(str(c.value))
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                         {"name": "ping", "parameters": {}}], schema)
    for bad in ([], [{"name": "other", "parameters": {}}],
                [{"name": "get_weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert required_schema(req.tools or [], parallel_tool_calls=False)["maxItems"] == 1


def test_required_schema_matches_vllms() -> None:
    """Same schema as vLLM's own server builds (its helper, imported only here)."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest as VllmRequest,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER, NOARGS], "tool_choice": "required"}
    vreq = VllmRequest.model_validate(body)
    ours = tool_constraint(chat(tools=[WEATHER, NOARGS], tool_choice="required"))
    assert ours is not None
    assert json.loads(str(ours.value)) == get_json_schema_from_tools(
        vreq.tool_choice, vreq.tools, vreq.parallel_tool_calls)


def test_forced_calls_from_constrained_output() -> None:
    named = chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}})
    [call] = forced_tool_calls("named", named, '{"city": "Rome"}')
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Rome"}'
    req = chat(tools=[WEATHER, NOARGS], tool_choice="required")
    calls = forced_tool_calls(
        "required", req, '[{"name": "ping", "parameters": {}}, '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}]')
    assert [c.function.name for c in calls] == ["ping", "get_weather"]
    assert json.loads(calls[1].function.arguments) == {"city": "Rome"}
    assert forced_tool_calls("required", req, '[{"name": "pi') == []  # cut by max_tokens


def test_named_stream() -> None:
    named = chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}})
    s = NamedToolStream(named)
    deltas = s.add('{"ci') + s.add('ty": "Rome"}') + s.finish()
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == \
        '{"city": "Rome"}'
    assert {d.index for d in deltas} == {0}


def test_template_messages_carry_tool_calls_as_objects() -> None:
    req = chat(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])
    assistant, tool = (template_message(m) for m in req.messages[1:])
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
