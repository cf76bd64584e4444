"""SSE frames of the common streamed chunks, from JSON built once per request.

Almost every chunk of a stream differs from the last only in its text: same id,
created, model; one choice; no logprobs, tool calls or reasoning. Building a pydantic
model, dumping it, pruning nulls and encoding the dict again for each of them was the
gateway's largest per-token cost (docs/benchmarks.md, "The front end's share"). These
templates write those chunks straight from strings, byte for byte what the general path
(``ChatCompletionChunk(...).model_dump()`` → ``json.dumps(separators=(",", ":"))``)
writes; anything else still takes the general path.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii as _quote  # json.dumps of a str


def _null_or_quoted(value: str | None) -> str:
    return "null" if value is None else _quote(value)


class ChatChunkTemplate:
    """``data: {chat.completion.chunk}`` frames of one request's plain text deltas."""

    def __init__(self, request_id: str, created: int, model: str) -> None:
        self._head = (f'data: {{"id":{_quote(request_id)},"object":"chat.completion.chunk",'
                      f'"created":{int(created)},"model":{_quote(model)},"choices":[{{"index":')

    def content(self, index: int, content: str, finish_reason: str | None) -> str:
        """One choice's content delta ('' → an empty delta, as a last chunk has)."""
        delta = f'{{"content":{_quote(content)}}}' if content else "{}"
        return (f'{self._head}{int(index)},"delta":{delta},'
                f'"finish_reason":{_null_or_quoted(finish_reason)},"logprobs":null}}]}}\n\n')


class CompletionChunkTemplate:
    """``data: {text_completion}`` frames of one request's text deltas (no logprobs)."""

    def __init__(self, request_id: str, created: int, model: str) -> None:
        self._head = (f'data: {{"id":{_quote(request_id)},"object":"text_completion",'
                      f'"created":{int(created)},"model":{_quote(model)},"choices":[{{"index":')

    def text(self, index: int, text: str, finish_reason: str | None) -> str:
        return (f'{self._head}{int(index)},"text":{_quote(text)},'
                f'"finish_reason":{_null_or_quoted(finish_reason)},"logprobs":null}}]}}\n\n')
