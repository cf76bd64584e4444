"""Polling with a deadline: how tests wait for what another process does (and whether
one has exited)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import psutil

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


def gone(pid: int) -> bool:
    """The process has exited: no such process, or a zombie its parent has not reaped."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
