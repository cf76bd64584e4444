"""Polling with a deadline: how tests wait for what another process does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(read: Callable[[], T], wanted: T, timeout_s: float,
               interval_s: float = 0.05) -> T:
    """Poll ``read()`` until it returns ``wanted`` or ``timeout_s`` passes; the last
    value read (for the caller's assertion, which then shows what was seen)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value != wanted and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = read()
    return value
