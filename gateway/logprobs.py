"""Logprobs in the shapes `vllm serve` returns (pure).

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
Completions: ``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}`` with
``top_logprobs`` a list of ``{token: logprob}`` maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TokenText = Callable[[int], str]


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's logprob and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _entry(token: str, logprob: float) -> dict[str, Any]:
    # vLLM reports -inf as -9999.0 so the JSON stays valid.
    return {"token": token, "logprob": max(logprob, -9999.0),
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
    tokens, token_logprobs, offsets, tops = [], [], [], []
    offset = start_offset
    for item in items:
        token = token_text(item.token_id)
        tokens.append(token)
        token_logprobs.append(max(item.logprob, -9999.0))
        offsets.append(offset)
        offset += len(token)
        # Like vLLM: the sampled token, then the top alternatives.
        top = {token: max(item.logprob, -9999.0)}
        for tid, lp in _ranked(item, top_n):
            top.setdefault(token_text(tid), max(lp, -9999.0))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": tops}
