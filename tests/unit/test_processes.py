"""Children die with their parent without Python running between fork and exec."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kvmesh.core.processes import dying_with_parent

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
