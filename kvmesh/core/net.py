"""A free TCP port, for addresses a process must be told before it starts (NIXL's side
channel, Envoy's listener, a DP gang's meeting ports).

Such a port is picked now and bound later (an engine binds its NIXL side channel tens of
seconds after its config was written), and anything on the machine that binds port 0 or
connects out meanwhile draws from the kernel's ephemeral range. So the port is drawn
*below* that range (and above Ray's worker ports, 10002-19999 by default): a port only
another explicit choice could take. vLLM's NIXL listener thread dies silently on
EADDRINUSE and its engine then waits forever for it, so the race is not harmless.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Lowest port handed out: above Ray's default worker port range (10002-19999).
FIRST_PORT = 20000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_TRIES = 64


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, outside the ephemeral range where one is (another
    process may still take it before it is used, but only by naming it)."""
    below = range(FIRST_PORT, ephemeral_start())
    for port in random.sample(below, min(_TRIES, len(below))):
        if bindable(host, port):
            return port
    with socket.socket() as s:  # a crowded (or unusual) machine: any free port
        s.bind((host, 0))
        return int(s.getsockname()[1])
