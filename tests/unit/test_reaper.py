"""The worker's reaper (real processes): a dead worker's engine processes end with it;
a worker that stops its engine leaves the reaper nothing to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from kvmesh.worker import reaper
from tests.waiting import gone

PARENT = """
import subprocess, sys, time
import psutil
from kvmesh.worker import reaper
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
engine = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                           f"subprocess.Popen({SLEEP!r}); time.sleep(120)"])
time.sleep(0.5)  # its own child started
watcher = reaper.start([psutil.Process(engine.pid)])
print(engine.pid, watcher.pid, flush=True)
time.sleep(120)
"""


def until_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not gone(p)]


def test_a_sigkilled_workers_engine_processes_end_with_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        engine_pid, reaper_pid = map(int, parent.stdout.readline().split())
        engine_child = psutil.Process(engine_pid).children()[0].pid
        time.sleep(1.0)
        assert not gone(engine_pid) and not gone(engine_child)  # the parent lives: kept
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        assert until_gone([engine_pid, engine_child, reaper_pid], 10) == []
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_reaper_leaves_once_the_engine_is_stopped() -> None:
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    watcher = reaper.start([psutil.Process(engine.pid)])
    assert watcher is not None
    try:
        time.sleep(1.0)
        assert watcher.poll() is None
        engine.terminate()
        engine.wait(5)
        assert watcher.wait(5) == 0
    finally:
        for proc in (engine, watcher):
            if proc.poll() is None:
                proc.kill()


def test_a_reused_pid_is_not_taken_for_the_engine() -> None:
    me = psutil.Process()
    assert reaper.resolve(reaper.identify([me])) == [me]
    assert reaper.resolve([f"{me.pid}:{me.create_time() + 1.0!r}"]) == []
    assert reaper.start([]) is None
