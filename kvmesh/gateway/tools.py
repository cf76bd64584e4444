"""Tool calling: what the chat template sees, and forced tool calls (pure).

``tool_choice`` "required" or a named function is guaranteed by structured output:
the worker's vLLM decodes under a JSON schema over the tool-call shape (the same
schemas vLLM's own server uses), and the gateway turns that JSON into tool calls.
"auto" leaves the model free; its output goes through vLLM's tool parser
(:mod:`kvmesh.gateway.parsers`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    ToolDef,
)
from kvmesh.gateway.structured import Constraint


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _parameters(tool: ToolDef) -> dict[str, Any]:
    # Missing parameters still constrain the arguments to a JSON object.
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_mode(req: ChatCompletionRequest) -> str:
    """"none", "auto", "required" or "named" (no tools means "none")."""
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError(
                "tool_choice requires `tools` to be set", param="tool_choice"
            )
        return "none"
    if isinstance(req.tool_choice, NamedToolChoice):
        return "named"
    return req.tool_choice or "auto"


def named_tool(req: ChatCompletionRequest) -> ToolDef:
    assert isinstance(req.tool_choice, NamedToolChoice) and req.tools
    for tool in req.tools:
        if tool.function.name == req.tool_choice.function.name:
            return tool
    raise InvalidRequestError(
        f"Tool '{req.tool_choice.function.name}' has not been passed in `tools`.",
        param="tool_choice",
    )


def required_schema(tools: list[ToolDef], parallel_tool_calls: bool | None) -> dict[str, Any]:
    """A JSON array of ``{"name", "parameters"}`` objects, one of the given tools each."""
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        params = dict(_parameters(tool))
        for name, def_schema in (params.pop("$defs", None) or {}).items():
            if name in defs and defs[name] != def_schema:
                raise InvalidRequestError(
                    f"Tool definition '{name}' has multiple schemas", param="tools"
                )
            defs[name] = def_schema
        variants.append({
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "parameters": params,
            },
            "required": ["name", "parameters"],
        })
    schema: dict[str, Any] = {
        "type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants},
    }
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def tool_constraint(req: ChatCompletionRequest) -> Constraint | None:
    """The structured output that guarantees a required/named tool call, if any."""
    mode = tool_mode(req)
    if mode == "named":
        schema = _parameters(named_tool(req))
    elif mode == "required":
        assert req.tools
        schema = required_schema(req.tools, req.parallel_tool_calls)
    else:
        return None
    return Constraint("json_schema", json.dumps(schema, separators=(",", ":")), "tool_choice")


def template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """Tool definitions as chat templates expect them (OpenAI's shape, as dicts)."""
    if not req.tools:
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A chat message as templates expect it: text content, and tool-call arguments
    as objects (templates index into them), like vLLM's own server does."""
    out: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments: Any = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = call.function.arguments
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def forced_tool_calls(mode: str, req: ChatCompletionRequest, text: str) -> list[ToolCall]:
    """The tool calls in a required/named choice's constrained output."""
    if mode == "named":
        return [ToolCall(id=tool_call_id(), function=FunctionCall(
            name=named_tool(req).function.name, arguments=text))]
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []  # cut off by max_tokens: no complete call to report
    return [
        ToolCall(id=tool_call_id(), function=FunctionCall(
            name=item["name"], arguments=json.dumps(item["parameters"], ensure_ascii=False)))
        for item in items
        if isinstance(item, dict) and "name" in item and "parameters" in item
    ]


@dataclass
class NamedToolStream:
    """Streams a named tool choice: the constrained output *is* the arguments, so they
    stream as generated after one delta with the id and name (as vLLM's server does).
    A required choice streams through vLLM's own scanner (``RequiredToolStream``)."""

    req: ChatCompletionRequest
    _started: bool = False
    _id: str = field(default_factory=tool_call_id)

    def add(self, delta: str) -> list[DeltaToolCall]:
        out = []
        if not self._started:
            self._started = True
            out.append(DeltaToolCall(index=0, id=self._id, type="function",
                                     function=DeltaFunctionCall(
                                         name=named_tool(self.req).function.name,
                                         arguments="")))
        if delta:
            out.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta)))
        return out

    def finish(self) -> list[DeltaToolCall]:
        return self.add("") if not self._started else []
