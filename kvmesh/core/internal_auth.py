"""The internal credential: a shared token in gRPC metadata that the router demands on
the RPCs that change its worker set (register, heartbeat, deregister), with or without
mutual TLS — a client that can reach the router's port cannot enrol a worker of its
own (and draw traffic to it) or evict real ones without it."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from pydantic import SecretStr

from kvmesh.core.errors import AuthenticationError
from kvmesh.core.security_config import INTERNAL_TOKEN_ENV

#: gRPC metadata key carrying the token (lower case, as gRPC requires).
TOKEN_METADATA_KEY = "kvmesh-internal-token"


def token_metadata(token: SecretStr | None) -> tuple[tuple[str, str], ...]:
    """What a worker or gateway sends with its registration RPCs."""
    return ((TOKEN_METADATA_KEY, token.get_secret_value()),) if token is not None else ()


def check_internal_token(
    metadata: Iterable[tuple[str, str | bytes]] | None, expected: SecretStr | None, rpc: str
) -> None:
    """Raise :class:`AuthenticationError` (UNAUTHENTICATED, with details) unless the
    call carries ``expected``. Compared in constant time; the token never appears in
    the message."""
    if expected is None:
        raise AuthenticationError(
            f"{rpc} refused: this router has no internal token configured, so it accepts "
            f"no registrations; set security.internal_token or {INTERNAL_TOKEN_ENV} on the "
            "router and on its workers and gateways", param=TOKEN_METADATA_KEY)
    sent = [value for key, value in metadata or () if key == TOKEN_METADATA_KEY]
    if not sent:
        raise AuthenticationError(
            f"{rpc} needs the mesh's internal token in the '{TOKEN_METADATA_KEY}' metadata "
            f"(set security.internal_token or {INTERNAL_TOKEN_ENV} on the caller)",
            param=TOKEN_METADATA_KEY)
    value = sent[0]
    given = value if isinstance(value, bytes) else value.encode()
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise AuthenticationError(
            f"{rpc} refused: wrong internal token in '{TOKEN_METADATA_KEY}'",
            param=TOKEN_METADATA_KEY)
