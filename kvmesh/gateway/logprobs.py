"""Logprobs in the shapes `vllm serve` returns (pure).

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
Completions: ``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}`` with
``top_logprobs`` a list of ``{token: logprob}`` maps. With ``echo`` the prompt's tokens
come first; the first prompt token has nothing before it, so its logprob and its top
map are null.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TokenText = Callable[[int], str]


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob and the top alternatives (token id, logprob).

    ``logprob`` is None only for a prompt's first token (no context predicts it).
    """

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


#: Most alternatives per token the API accepts (vLLM's default ``max_logprobs``).
MAX_TOP_LOGPROBS = 20


def prompt_logprobs_to_request(top_n: int) -> int:
    """How many prompt alternatives to ask the worker for, to show ``top_n``.

    vLLM's servicer keeps the first ``k`` entries of each position's map, and the
    prompt token itself comes first; vLLM's own server shows that token *and* the
    top ``top_n``. One more than shown keeps the top ``top_n`` whenever the prompt
    token is not among them (capped at the engine's limit).
    """
    return min(top_n + 1, MAX_TOP_LOGPROBS)


def _clamp(logprob: float) -> float:
    # vLLM reports -inf as -9999.0 so the JSON stays valid.
    return max(logprob, -9999.0)


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": _clamp(logprob if logprob is not None else -9999.0),
            "bytes": list(token.encode("utf-8", errors="replace"))}


def _ranked(item: TokenLogprob, top_n: int) -> list[tuple[int, float]]:
    return sorted(item.top, key=lambda t: -t[1])[:top_n]


def chat_logprobs(
    items: Sequence[TokenLogprob], top_n: int, token_text: TokenText
) -> dict[str, Any]:
    content = []
    for item in items:
        entry = _entry(token_text(item.token_id), item.logprob)
        entry["top_logprobs"] = [
            _entry(token_text(tid), lp) for tid, lp in _ranked(item, top_n)
        ]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    items: Sequence[TokenLogprob], top_n: int, token_text: TokenText, start_offset: int
) -> dict[str, Any]:
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    offsets: list[int] = []
    tops: list[dict[str, float] | None] = []
    offset = start_offset
    for item in items:
        token = token_text(item.token_id)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if item.logprob is None:  # a prompt's first token
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(_clamp(item.logprob))
        # Like vLLM: the sampled (or prompt) token, then the top alternatives.
        top = {token: _clamp(item.logprob)}
        for tid, lp in _ranked(item, top_n):
            top.setdefault(token_text(tid), _clamp(lp))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": tops}
