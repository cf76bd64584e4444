"""Incremental detokenization with stop strings (pure; no grpc/vllm).

Token ids stream in from a worker; text streams out. Stop strings are matched on the
text: output is held back just enough that a stop string split across tokens never
leaks to the client, and everything from the earliest match on is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextAssembler:
    """Turns one choice's token ids into text deltas, honouring stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._include_stop = include_stop_str
        self._text = ""  # everything decoded so far
        self._emitted = 0  # chars of _text already handed out
        self.token_ids: list[int] = []
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._emitted]

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; return the text that may now be shown."""
        if self.stopped_by is not None:
            return ""
        for token in token_ids:
            self.token_ids.append(token)
            piece = self._stream.step(self._tokenizer, token)
            if piece:
                self._text += piece
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: release what was held back."""
        if self.stopped_by is not None:
            return ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            # A match may start inside the held-back tail, never before it.
            search_from = max(0, self._emitted - self._hold)
            best: tuple[int, str] | None = None
            for s in self._stop:
                at = self._text.find(s, search_from)
                if at != -1 and (best is None or at < best[0]):
                    best = (at, s)
            if best is not None:
                at, s = best
                end = at + len(s) if self._include_stop else at
                self._text = self._text[:end]
                self.stopped_by = s
                final = True
        limit = len(self._text) if final else max(self._emitted, len(self._text) - self._hold)
        delta = self._text[self._emitted : limit]
        self._emitted = limit
        return delta
