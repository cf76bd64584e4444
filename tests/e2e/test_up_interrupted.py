"""Ctrl-C while `kvmesh up` is still loading vLLM leaves no process behind: the engine
process a worker actor started (vLLM's EngineCore) is ended with the actor."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from kvmesh.launch.procs import pid_alive, spawn_module, terminate

from .conftest import ENGINE_FLAGS

pytestmark = pytest.mark.e2e


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _describe(pid: int) -> str:
    """Process name and command line ("?" once it is gone)."""
    try:
        proc = psutil.Process(pid)
        return f"{proc.name()}: {' '.join(proc.cmdline())}"
    except psutil.Error:
        return "?"


def test_interrupt_during_engine_start_ends_every_process(model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kvm-upint-") as d:
        log = Path(d) / "up.log"
        up = spawn_module("kvmesh.cli", ["up", "--workers", "1", "--no-embeddings",
                                         "--port", "0", "--state-file", str(Path(d) / "up.json"),
                                         *ENGINE_FLAGS], log)
        seen: set[int] = set()
        engine = None
        try:
            deadline = time.monotonic() + 300
            while engine is None and time.monotonic() < deadline and up.poll() is None:
                tree = _tree(up.pid)
                seen.update(p.pid for p in tree)
                engine = next((p for p in tree if "EngineCore" in _describe(p.pid)), None)
                time.sleep(0.2)
            assert engine is not None, log.read_text()[-4000:]
            # Interrupt while vLLM's engine loads (the actor is busy in start()).
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail("kvmesh up did not stop after Ctrl-C:\n" + log.read_text()[-4000:])
        finally:
            terminate(up, 5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(pid_alive(p) for p in seen):
            time.sleep(0.2)
        left = {p: _describe(p) for p in seen if pid_alive(p)}
        for pid in left:  # ours: started below this test's `kvmesh up`
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        assert engine.pid not in left, log.read_text()[-4000:]
        assert not left, left
