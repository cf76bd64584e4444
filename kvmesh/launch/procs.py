"""Child processes that die with their parent and are stopped by PID, never by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvmesh.core.processes import die_with_parent, dying_with_parent, terminate

__all__ = ["die_with_parent", "terminate", "spawn_module", "wait_ready_file", "pid_alive"]


def spawn_module(
    module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m module args...`` with output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    argv, preexec = dying_with_parent([sys.executable, "-m", module, *args])
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec)


def wait_ready_file(
    path: Path, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, what: str = ""
) -> dict[str, Any]:
    """Wait until a service publishes its ready file; fail fast if it dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or 'service'} exited with code {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{what or 'service'} not ready after {timeout_s:.0f}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
