"""Ends a worker's engine processes when the worker dies without stopping them.

vLLM's engine core is a process of its own that does not watch its parent: a worker
SIGKILLed (or OOM-killed, or a Ray actor killed) would leave it running for good, with
the model's weights, its KV cache and its spinning cores. So once its engine runs, a
worker starts this small process (``python -m kvmesh.worker.reaper``) with the engine's
processes: it polls its parent, and when the parent is gone it ends them (SIGTERM, and
SIGKILL after a grace) with whatever they started. When they end first (the worker
stopped its engine), it exits by itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import psutil

log = logging.getLogger(__name__)
POLL_S = 0.5
GRACE_S = 5.0


def identify(processes: Sequence[psutil.Process]) -> list[str]:
    """``PID:CREATE_TIME`` per process: a pid reused meanwhile is not mistaken for it."""
    return [f"{p.pid}:{p.create_time()!r}" for p in processes]


def resolve(identities: Sequence[str]) -> list[psutil.Process]:
    """The processes still running under those identities."""
    found = []
    for identity in identities:
        pid, _, created = identity.partition(":")
        try:
            process = psutil.Process(int(pid))
            if repr(process.create_time()) == created:
                found.append(process)
        except psutil.Error:
            continue
    return found


def end(targets: Sequence[psutil.Process], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM ``targets`` and their descendants, SIGKILL what is left after ``grace_s``;
    returns the pids ended."""
    victims: dict[int, psutil.Process] = {}
    for target in targets:
        try:
            for process in [target, *target.children(recursive=True)]:
                victims[process.pid] = process
        except psutil.Error:
            continue
    for process in victims.values():
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(list(victims.values()), timeout=grace_s)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            continue
    return sorted(victims)


def watch(parent_pid: int, targets: Sequence[psutil.Process],
          parent: Callable[[], int] = os.getppid, poll_s: float = POLL_S,
          grace_s: float = GRACE_S) -> list[int]:
    """Wait until the targets end (returns []) or the parent is gone (ends them; returns
    the pids ended)."""
    while True:
        alive = [t for t in targets if t.is_running()]
        if not alive:
            return []
        if parent() != parent_pid:  # the worker died: this process was handed over
            return end(alive, grace_s)
        time.sleep(poll_s)


def start(processes: Sequence[psutil.Process]) -> subprocess.Popen[bytes] | None:
    """This process's reaper for ``processes`` (none to watch: None). It runs in a
    session of its own, so a signal to the worker's process group spares it."""
    if not processes:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "kvmesh.worker.reaper", "--parent", str(os.getpid()),
         *identify(processes)],
        stdin=subprocess.DEVNULL, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="end a dead worker's engine processes")
    parser.add_argument("--parent", type=int, required=True, help="the worker's pid")
    parser.add_argument("targets", nargs="+", help="PID:CREATE_TIME of each process")
    args = parser.parse_args(argv)
    ended = watch(args.parent, resolve(args.targets))
    if ended:
        print(f"kvmesh reaper: worker {args.parent} died; ended its engine processes "
              f"{ended}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
