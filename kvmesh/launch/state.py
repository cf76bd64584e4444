"""Where a running `kvmesh up` says what it started, so `kvmesh status` and
`kvmesh down` find it without flags.

The state is a JSON file (addresses, the PIDs of `kvmesh up` and of every process it
started, the run directory) at ``$KVMESH_STATE_FILE``, else
``$XDG_RUNTIME_DIR/kvmesh/up.json``, else ``~/.cache/kvmesh/up.json``. `kvmesh up`
writes it once the mesh answers and removes it when it stops; a file whose `kvmesh up`
process is gone (killed, crashed) is stale and says so.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from kvmesh.launch.procs import pid_alive


def _alive(pid: int) -> bool:
    return pid > 0 and pid_alive(pid)


class NoMeshError(RuntimeError):
    """No running `kvmesh up` is recorded where we looked."""


def default_state_file() -> Path:
    explicit = os.environ.get("KVMESH_STATE_FILE")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path.home() / ".cache"
    return base / "kvmesh" / "up.json"


def read_state(path: Path | None = None) -> dict[str, Any]:
    """The state of the running mesh; NoMeshError says where none was found."""
    path = path or default_state_file()
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoMeshError(f"no running kvmesh up: {path} does not exist "
                          "(start one with `kvmesh up`, or pass --state-file)") from None
    if not _alive(int(state.get("pid", -1))):
        raise NoMeshError(f"{path} is stale: its kvmesh up (pid {state.get('pid')}) is gone; "
                          "`kvmesh down` cleans up what it left")
    return state


def claim(path: Path) -> None:
    """Refuse to start a second mesh over a live one's state file."""
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return
    if _alive(int(state.get("pid", -1))) and int(state["pid"]) != os.getpid():
        raise NoMeshError(f"a kvmesh up is already running (pid {state['pid']}, {path}); "
                          "stop it with `kvmesh down` or pass another --state-file")


def release(path: Path) -> None:
    """Remove the state file if it is this process's."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (FileNotFoundError, ValueError):
        return


def mesh_pids(state: dict[str, Any]) -> list[int]:
    """`kvmesh up` first, then every process it started."""
    pids = state.get("pids", {})
    gateways = pids.get("gateways") or [pids.get("gateway", -1)]
    return [int(state.get("pid", -1)), int(pids.get("router", -1)), int(pids.get("edge", -1)),
            *(int(p) for p in gateways), *(int(p) for p in pids.get("workers", []))]


def stop_mesh(path: Path | None = None, timeout_s: float = 90.0) -> dict[str, Any]:
    """Stop the recorded mesh by its PIDs only: SIGINT to `kvmesh up` (its ordered
    stop, as Ctrl-C), then SIGTERM and finally SIGKILL to whatever it recorded that is
    still alive after ``timeout_s``. Returns what was stopped."""
    path = path or default_state_file()
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoMeshError(f"no running kvmesh up: {path} does not exist") from None
    pids = [p for p in mesh_pids(state) if p > 0]
    up_pid = pids[0] if pids else -1
    if _alive(up_pid):
        os.kill(up_pid, signal.SIGINT)
    forced: list[int] = []
    for sig, wait_s in ((None, timeout_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, sig)
                    forced.append(pid)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            break
    path.unlink(missing_ok=True)
    return {"stopped": pids, "forced": sorted(set(forced)),
            "alive": [p for p in pids if _alive(p)], "state_file": str(path)}
