"""The pre-built SSE chunk templates write exactly what the general (pydantic) path
writes, for any text, id, model and finish reason."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.gateway.http.chat import _without_nulls
from kvmesh.gateway.http.chunk_json import ChatChunkTemplate, CompletionChunkTemplate
from kvmesh.gateway.http.streaming import sse, without_null_usage
from kvmesh.gateway.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
)

pytestmark = pytest.mark.unit

TEXTS = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", " Paris", '"quoted"\n', "\\", "Ünïcödé ✓", "\u2028", "😀", "\x00\x1f"])
REASONS = st.sampled_from([None, "stop", "length", "tool_calls"])


def general_chat(rid: str, created: int, model: str, index: int, content: str,
                 reason: str | None) -> str:
    """The chat renderer's general path (as in kvmesh/gateway/http/chat.py)."""
    payload = without_null_usage(ChatCompletionChunk(
        id=rid, created=created, model=model, choices=[ChatChunkChoice(
            index=index, delta=ChatDelta(content=content or None), finish_reason=reason)],
    ).model_dump())
    for choice in payload["choices"]:
        choice["delta"] = _without_nulls(choice["delta"])
    return sse(payload)


def general_completion(rid: str, created: int, model: str, index: int, text: str,
                       reason: str | None) -> str:
    return sse(without_null_usage(CompletionResponse(
        id=rid, created=created, model=model,
        choices=[CompletionChoice(index=index, text=text, finish_reason=reason)],
    ).model_dump()))


@settings(max_examples=300, deadline=None)
@given(rid=TEXTS, created=st.integers(0, 2**40), model=TEXTS, index=st.integers(0, 64),
       content=TEXTS, reason=REASONS)
def test_chat_template_is_byte_identical(rid: str, created: int, model: str, index: int,
                                         content: str, reason: str | None) -> None:
    fast = ChatChunkTemplate(rid, created, model).content(index, content, reason)
    assert fast == general_chat(rid, created, model, index, content, reason)
    assert json.loads(fast.removeprefix("data: "))["choices"][0]["delta"].get(
        "content", "") == content


@settings(max_examples=300, deadline=None)
@given(rid=TEXTS, created=st.integers(0, 2**40), model=TEXTS, index=st.integers(0, 64),
       text=TEXTS, reason=REASONS)
def test_completion_template_is_byte_identical(rid: str, created: int, model: str,
                                               index: int, text: str,
                                               reason: str | None) -> None:
    fast = CompletionChunkTemplate(rid, created, model).text(index, text, reason)
    assert fast == general_completion(rid, created, model, index, text, reason)
