"""Real vLLM on CPU: `kvmesh up`, and a plain vLLM gRPC server for interop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kvmesh.core.grpc_util import wait_serving
from kvmesh.core.net import free_port
from kvmesh.launch.procs import pid_alive, spawn_module, terminate, wait_ready_file

MODEL = "SmolLM2-135M-Instruct"
ENGINE_FLAGS = ["--enforce-eager", "--block-size", "32"]


class UpProcess:
    """A `kvmesh up` process and what it reported."""

    def __init__(self, workdir: Path, topology: tuple[str, ...] = ("--workers", "2"),
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.state_file = workdir / "up.json"
        self.log = workdir / "up.log"
        self.proc = spawn_module(
            "kvmesh.cli",
            # Two workers (by default): what `kvmesh up --workers 2` must do on a
            # 2-core machine.
            ["up", *topology, "--port", "0", *ENGINE_FLAGS,
             "--state-file", str(self.state_file), *extra],
            self.log, env=env,
        )
        try:
            # Longer than kvmesh up's own startup_timeout_s (600 s): a worker that never
            # starts is reported by kvmesh up itself (which one, the tail of its log).
            self.state: dict[str, Any] = wait_ready_file(
                self.state_file, 720, self.proc, "kvmesh up")
        except BaseException:
            self.dump()
            terminate(self.proc, 60)
            raise

    def all_pids(self) -> list[int]:
        pids = self.state["pids"]
        return [self.proc.pid, pids["router"], pids["gateway"], *pids["workers"]]

    def interrupt(self, timeout_s: float = 90) -> int:
        """Ctrl-C, as a user would; then no process it started outlives it (Ray's
        daemons and actors, engine cores): one left spinning would slow, or share
        sockets with, the next test's mesh. Survivors are reported and ended."""
        try:
            started = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            started = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                terminate(self.proc, 5)
        _, alive = psutil.wait_procs(started, timeout=15)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                print(f"kvmesh up left {child.pid} ({' '.join(child.cmdline())[:80]}); ended")
                child.kill()
        return int(self.proc.returncode)

    def dump(self) -> None:
        print(self.log.read_text()[-6000:] if self.log.exists() else "(no log)")
        run_dir = self.state.get("run_dir") if hasattr(self, "state") else None
        for f in sorted(Path(run_dir).glob("*.log")) if run_dir else []:
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def kvmesh_up(model_dir: Path) -> Iterator[UpProcess]:
    with tempfile.TemporaryDirectory(prefix="kvm-up-") as d:
        up = UpProcess(Path(d))
        try:
            yield up
        finally:
            up.interrupt()


class PlainVllm:
    """vLLM's own gRPC server (`vllm.entrypoints.launchers.grpc_server`), unchanged."""

    def __init__(self, model_dir: Path, workdir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        kv_events = {
            "enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": f"ipc://{workdir}/plain-kv", "replay_endpoint": f"ipc://{workdir}/plain-kvr",
            "topic": "kv-events",
        }
        env = {
            **os.environ, "HF_HUB_OFFLINE": "1", "SMG_VLLM_SERVICER_WARMUP": "off",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_USE_AOT_COMPILE": "0",
        }
        self.log = workdir / "plain-vllm.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.launchers.grpc_server",
             "--model", str(model_dir), "--served-model-name", MODEL,
             "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "4096",
             *ENGINE_FLAGS, "--kv-events-config", json.dumps(kv_events)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
            stdin=subprocess.DEVNULL,
        )
        try:
            asyncio.run(wait_serving(self.endpoint, 600))
        except BaseException:
            print(self.log.read_text()[-6000:])
            terminate(self.proc, 30)
            raise


@pytest.fixture(scope="module")
def plain_vllm(model_dir: Path) -> Iterator[PlainVllm]:
    with tempfile.TemporaryDirectory(prefix="kvm-pv-") as d:
        server = PlainVllm(model_dir, Path(d))
        try:
            yield server
        finally:
            terminate(server.proc, 60)


__all__ = ["MODEL", "UpProcess", "PlainVllm", "free_port", "pid_alive"]
