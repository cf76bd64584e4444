"""Children die with their parent without Python running between fork and exec."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from kvmesh.core.processes import dying_with_parent, renice

pytestmark = pytest.mark.unit

PARENT = """
import subprocess, sys, threading, time
from kvmesh.core.processes import dying_with_parent
# Threads running while forking, as gRPC's are in every kvmesh process.
for _ in range(4):
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
argv, preexec = dying_with_parent(["sleep", "60"])
child = subprocess.Popen(argv, preexec_fn=preexec)
print(child.pid, flush=True)
"""


def test_a_child_gets_no_preexec_and_dies_with_its_parent() -> None:
    argv, preexec = dying_with_parent(["sleep", "1"])
    assert preexec is None and argv[-2:] == ["sleep", "1"]  # setpriv is on these machines
    parent = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "PYTHONPATH": os.getcwd()})
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as stat:
            if stat.read().split()[2] == "Z":  # exited, waiting to be reaped by init
                return
        time.sleep(0.05)
    os.kill(child, 9)
    pytest.fail("the child outlived its parent")


def test_renice_reaches_every_thread_of_the_process_and_its_children() -> None:
    """Linux keeps a niceness per thread: the engine's threads already running (its
    OpenMP pool) and its children's are all made nicer, the caller untouched."""
    code = ("import os, subprocess, sys, threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        parent = psutil.Process(proc.pid)
        assert len(parent.threads()) >= 2
        assert renice([parent], 0) == []
        assert sorted(renice([parent], 7)) == sorted([proc.pid, grandchild])
        nices = [os.getpriority(os.PRIO_PROCESS, t.id)
                 for pid in (proc.pid, grandchild) for t in psutil.Process(pid).threads()]
        assert nices and set(nices) == {7}
        renice([parent], 30)  # capped at 19, the highest niceness
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
        assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == 0
    finally:
        for pid in psutil.Process(proc.pid).children(recursive=True):
            pid.kill()
        proc.kill()
        proc.wait()
