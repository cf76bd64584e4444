"""What one ADS stream was sent and what Envoy made of it (pure bookkeeping, no grpc).

State-of-the-world ADS is a conversation per resource type: the server sends a version
with a nonce; Envoy answers every response with that nonce, either an ACK (its
``version_info`` is now the version it applied) or a NACK (``error_detail`` set, and
``version_info`` still the last version it accepted, which it keeps running). An answer
whose nonce is not the latest one sent for that type refers to a response superseded
since, and says nothing about the current one, so it is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class Answer(Enum):
    """What an incoming DiscoveryRequest meant."""

    SUBSCRIBE = "subscribe"  # the first request of a type: nothing sent yet to answer
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # answers a response superseded since


@dataclass(frozen=True)
class Sent:
    version: int
    nonce: str


@dataclass
class StreamState:
    """One Envoy's ADS stream: what it subscribed to, what it was sent, what it applied.

    ``acked`` maps a type URL to the version Envoy last applied; ``nacks`` keeps
    Envoy's error of every version it rejected; ``rejected`` the version numbers."""

    type_order: Sequence[str]
    node_id: str = ""
    subscribed: list[str] = field(default_factory=list)
    sent: dict[str, Sent] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)
    nacks: dict[str, list[str]] = field(default_factory=dict)
    rejected: dict[str, list[int]] = field(default_factory=dict)
    _nonce: int = 0

    def due(self, version: int) -> list[tuple[str, str]]:
        """(type URL, nonce) of each subscribed type not yet sent ``version``, in the
        order Envoy wants them (clusters before endpoints, listeners before routes);
        records them as sent. Version 0 means nothing is published yet."""
        if not version:
            return []
        out = []
        for type_url in sorted(self.subscribed, key=self._rank):
            previous = self.sent.get(type_url)
            if previous is None or previous.version != version:
                self._nonce += 1
                self.sent[type_url] = Sent(version, str(self._nonce))
                out.append((type_url, str(self._nonce)))
        return out

    def answer(self, type_url: str, version_info: str, nonce: str,
               error: str | None = None) -> Answer:
        """Book one DiscoveryRequest from Envoy; ``error`` is its error_detail message."""
        if type_url not in self.subscribed:
            self.subscribed.append(type_url)
        if not nonce:
            return Answer.SUBSCRIBE
        sent = self.sent.get(type_url)
        if sent is None or sent.nonce != nonce:
            return Answer.STALE
        if error is not None:
            self.nacks.setdefault(type_url, []).append(error)
            self.rejected.setdefault(type_url, []).append(sent.version)
            return Answer.NACK
        self.acked[type_url] = version_info
        return Answer.ACK

    def applied(self, version: int) -> bool:
        """True once Envoy ACKed ``version`` of every type it subscribed to."""
        return bool(self.subscribed) and all(
            self.acked.get(t) == str(version) for t in self.subscribed)

    def _rank(self, type_url: str) -> int:
        order = list(self.type_order)
        return order.index(type_url) if type_url in order else len(order)
