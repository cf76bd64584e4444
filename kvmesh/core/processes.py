"""Child processes that die with their parent and are stopped by their own handle
(SIGTERM, then SIGKILL), never by name: other people's processes share the machine."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable

import psutil

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child (``preexec_fn``): get SIGTERM when the parent dies (Linux), so a
    crashed launcher leaves nothing behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def dying_with_parent(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` made to get SIGTERM when its parent dies, and the ``preexec_fn`` that
    needs (None): util-linux's ``setpriv --pdeathsig`` sets it in the child after the fork,
    so no Python runs between fork and exec — a ``preexec_fn`` in a parent with threads
    (gRPC's) can deadlock or crash the child before it starts. Without setpriv, the
    ``preexec_fn``."""
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv], None
    return argv, die_with_parent


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=5)


def renice(processes: Iterable[psutil.Process], increment: int) -> list[int]:
    """Add ``increment`` to the niceness of every thread of ``processes`` and of their
    descendants (Linux keeps a niceness per thread: setting a process's applies to its
    main thread only). Threads started later inherit their creator's. Returns the pids
    changed; a process that ended meanwhile is skipped."""
    if increment <= 0:
        return []
    changed = []
    for process in processes:
        try:
            family = [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
        for member in family:
            try:
                for thread in member.threads():
                    current = os.getpriority(os.PRIO_PROCESS, thread.id)
                    os.setpriority(os.PRIO_PROCESS, thread.id, min(current + increment, 19))
            except (psutil.Error, ProcessLookupError):
                continue
            changed.append(member.pid)
    return changed
