"""API keys and admission limits (pure: no I/O).

Keys are compared in constant time (``hmac.compare_digest``) against every
configured key, so timing reveals neither which key matched nor how much of one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from dataclasses import dataclass

from kvmesh.core.errors import AuthenticationError, RateLimitedError

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    """A loggable name for a key (never the key itself)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass
class Slot:
    """One admitted request; release it exactly once when the request ends."""

    admission: Admission
    key: str
    stream: bool
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self)


class Admission:
    def __init__(
        self,
        api_keys: list[str],
        max_concurrent_requests: int | None,
        max_streams_per_key: int | None,
        retry_after_s: int,
    ) -> None:
        self._keys = [k.encode() for k in api_keys if k]
        self._max_requests = max_concurrent_requests
        self._max_streams = max_streams_per_key
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self._streams: Counter[str] = Counter()

    @property
    def auth_enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, bearer: str | None) -> str:
        """The caller's key id, or AuthenticationError. ``bearer`` is the credential
        (``Authorization: Bearer <key>`` over HTTP, the same metadata over gRPC)."""
        if not self._keys:
            return ANONYMOUS
        if bearer is None:
            raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
        scheme, _, token = bearer.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("invalid Authorization header: expected Bearer <key>")
        given = token.strip().encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise AuthenticationError("invalid API key")
        return key_id(token.strip())

    def admit(self, key: str, stream: bool) -> Slot:
        if self._max_requests is not None and self.in_flight >= self._max_requests:
            raise RateLimitedError(
                f"the server is overloaded ({self.in_flight} requests in flight); retry later",
                retry_after_s=self.retry_after_s,
            )
        if stream and self._max_streams is not None and self._streams[key] >= self._max_streams:
            raise RateLimitedError(
                f"too many concurrent streams for this API key (limit {self._max_streams})",
                retry_after_s=self.retry_after_s,
            )
        self.in_flight += 1
        if stream:
            self._streams[key] += 1
        return Slot(self, key, stream)

    def _release(self, slot: Slot) -> None:
        self.in_flight -= 1
        if slot.stream:
            self._streams[slot.key] -= 1
            if self._streams[slot.key] <= 0:
                del self._streams[slot.key]
