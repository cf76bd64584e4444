"""A free TCP port, for addresses a process must be told before it starts (NIXL's side
channel, Envoy's listener, a DP gang's meeting ports)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
