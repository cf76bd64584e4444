"""Hostile HTTP bodies against the gateway (fake-engine mesh): deeply nested and huge
JSON, invalid UTF-8, lone surrogates, negative and huge limits — each answered with a
clear 4xx OpenAI error object (naming the field at fault where there is one), never a
5xx, a hang or a dead gateway."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from .conftest import Mesh

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw_chat(extra: str) -> bytes:
    """The chat body with ``extra`` spliced in as raw JSON text."""
    return (json.dumps(CHAT)[:-1] + ", " + extra + "}").encode()


# (name, endpoint, body: dict or raw bytes, expected status, expected param or None)
CASES: list[tuple[str, str, Any, int, str | None]] = [
    ("nested 100k deep", "chat/completions", raw_chat(f'"metadata": {nested(100_000)}'),
     400, None),
    ("nested 100k deep at the top", "chat/completions", nested(100_000).encode(), 400, None),
    ("nested 1000 deep in tool parameters", "chat/completions",
     raw_chat('"tools": [{"type": "function", "function": {"name": "f", "parameters": '
              + '{"a": ' * 1000 + "{}" + "}" * 1000 + "}}]"), 400, None),
    ("nested 1000 deep in a json_schema", "chat/completions",
     raw_chat('"response_format": {"type": "json_schema", "json_schema": {"name": "s", '
              '"schema": ' + '{"items": ' * 1000 + "{}" + "}" * 1000 + "}}"), 400, None),
    ("invalid UTF-8", "chat/completions", b'{"model": "' + MODEL.encode()
     + b'", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}', 400, None),
    ("lone surrogate", "chat/completions",
     raw_chat('"user": "x"').replace(b'"hi"', b'"\\ud800"'), 400, "messages"),
    ("lone surrogate in a completion prompt", "completions",
     json.dumps({**COMPLETION, "prompt": "a\ud800b"}).encode("utf-8", "surrogatepass"),
     400, "prompt"),
    ("NaN temperature", "chat/completions", raw_chat('"temperature": NaN'), 400,
     "temperature"),
    ("Infinity top_p", "chat/completions", raw_chat('"top_p": Infinity'), 400, "top_p"),
    ("not JSON", "chat/completions", b"model=x&messages=y", 400, None),
    ("empty body", "chat/completions", b"", 400, None),
    ("a JSON list", "chat/completions", b"[1, 2, 3]", 400, None),
    ("huge content", "chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "word " * 1_500_000}]}, 400, None),
    ("100k messages", "chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x"}] * 100_000}, 400, None),
    ("10k stop strings", "chat/completions", {**CHAT, "stop": ["x"] * 10_000}, 400, "stop"),
    ("max_tokens -1", "chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens 0", "chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens 2**63", "chat/completions", {**CHAT, "max_tokens": 2**63}, 400,
     "max_tokens"),
    ("max_tokens 10**400", "chat/completions", raw_chat('"max_completion_tokens": '
                                                        + "9" * 400), 400,
     "max_completion_tokens"),
    ("max_tokens 1e308", "chat/completions", {**CHAT, "max_tokens": 1e308}, 400, "max_tokens"),
    ("n -1", "chat/completions", {**CHAT, "n": -1}, 400, "n"),
    ("n 10**9", "chat/completions", {**CHAT, "n": 10**9}, 400, "n"),
    ("logprobs -1", "completions", {**COMPLETION, "logprobs": -1}, 400, "logprobs"),
    ("top_logprobs 10**6", "chat/completions", {**CHAT, "logprobs": True,
                                                "top_logprobs": 10**6}, 400, "top_logprobs"),
    ("temperature -1", "chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("seed 2**64", "chat/completions", {**CHAT, "seed": 2**64}, 400, "seed"),
    ("logit_bias huge id", "chat/completions", {**CHAT, "logit_bias": {str(2**40): 1}}, 400,
     "logit_bias"),
    ("logit_bias not an id", "chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, 400,
     "logit_bias"),
    ("token ids negative", "completions", {**COMPLETION, "prompt": [1, -5, 3]}, 400,
     "prompt"),
    ("token ids huge", "completions", {**COMPLETION, "prompt": [2**40]}, 400, "prompt"),
    ("embeddings dimensions -1", "embeddings",
     {"model": MODEL, "input": "hi", "dimensions": -1}, 400, "dimensions"),
    ("embeddings 100k inputs", "embeddings", {"model": MODEL, "input": ["x"] * 100_000},
     400, None),
]


@pytest.mark.parametrize(("name", "endpoint", "body", "status", "param"), CASES,
                         ids=[c[0] for c in CASES])
def test_hostile_body_gets_a_clear_4xx(fake_mesh: Mesh, name: str, endpoint: str, body: Any,
                                       status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(f"{fake_mesh.http}/{endpoint}", content=content, timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == status, f"{name}: {reply.status_code} {reply.text[:300]}"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["message"], error
    if param is not None:
        assert (error["param"] or "").split(".")[0] == param, f"{name}: {error}"
    # The gateway is still there and well.
    assert httpx.post(f"{fake_mesh.http}/chat/completions", json=CHAT,
                      timeout=30).status_code == 200
