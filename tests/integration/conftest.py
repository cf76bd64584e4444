"""A whole mesh of real processes on free ports, with fake engines (fast)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import yaml as yaml_lib

from kvmesh.core.net import free_port  # noqa: F401 - tests import it from here
from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file


@dataclass
class Mesh:
    dir: Path
    router: str = ""
    router_metrics: str = ""
    http: str = ""
    grpc: str = ""
    workers: list[dict] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str, *extra: str, register: bool = True,
                     token_delay_s: float = 0.02, env: dict[str, str] | None = None) -> dict:
        ready = self.dir / f"{name}.ready"
        args = ["--no-ray", "--engine-kind", "fake", "--port", "0", "--worker-id", name,
                "--ready-file", str(ready), "--run-dir", str(self.dir), *extra]
        if register:
            args += ["--router", self.router]
        env = {**os.environ, "KVMESH_WORKER_FAKE_TOKEN_DELAY_S": str(token_delay_s),
               **(env or {})}
        proc = spawn_module("kvmesh.worker", args, self.dir / f"{name}.log", env=env)
        self.procs[name] = proc
        info = wait_ready_file(ready, 60, proc, name)
        info["pid"] = proc.pid
        return info

    def start_gateway(self, *extra: str, env: dict[str, str] | None = None,
                      timeout_s: float = 60, name: str = "gateway") -> dict:
        """A gateway in front of ``self.router``; waits until it answers /health. The
        mesh's ``http``/``grpc`` point at the latest one started."""
        ready = self.dir / f"{name}.ready"
        proc = spawn_module(
            "kvmesh.gateway",
            ["--router", self.router, "--port", "0", "--grpc-port", "0",
             "--ready-file", str(ready), *extra],
            self.dir / f"{name}.log", env=env,
        )
        self.procs[name] = proc
        gateway = wait_ready_file(ready, timeout_s, proc, name)
        self.http, self.grpc = gateway["http"], gateway["grpc"]
        _wait_healthy(self.http)
        return dict(gateway)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log"))
        )


def spawn_router(mesh: Mesh, name: str = "router", *extra: str,
                 env: dict[str, str] | None = None, yaml: str = "") -> Path:
    """Start a router process (from the calling thread: a child dies with the thread
    that forked it) and return its ready file, to wait on with ``router_ready``;
    ``yaml``: more of its config file, over the quick defaults below."""
    settings = {"policy": "round_robin", "heartbeat_interval_s": 0.5, "lease_ttl_s": 3,
                "probe_interval_s": 0.2, "metrics_port": 0}
    settings.update(yaml_lib.safe_load(yaml) or {})
    config = mesh.dir / f"{name}.yaml"
    config.write_text(yaml_lib.safe_dump(settings))
    ready = mesh.dir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    mesh.procs[name] = spawn_module(
        "kvmesh.router",
        ["--config", str(config), "--port", "0", "--ready-file", str(ready), *extra],
        mesh.dir / f"{name}.log", env={**os.environ, **(env or {})},
    )
    return ready


def router_ready(mesh: Mesh, name: str) -> str:
    info = wait_ready_file(mesh.dir / f"{name}.ready", 30, mesh.procs[name], name)
    mesh.router_metrics = mesh.router_metrics or info["metrics"]
    return str(info["grpc"])


def start_router(mesh: Mesh, name: str = "router", *extra: str,
                 env: dict[str, str] | None = None, yaml: str = "") -> str:
    spawn_router(mesh, name, *extra, env=env, yaml=yaml)
    return router_ready(mesh, name)


@contextlib.contextmanager
def running_mesh(prefix: str = "kvm-") -> Iterator[Mesh]:
    """A mesh in a fresh folder: its logs printed when starting it fails, every process
    it started terminated on the way out."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        mesh = Mesh(Path(d))
        try:
            yield mesh
        except BaseException:
            print(mesh.logs())
            raise
        finally:
            for proc in mesh.procs.values():
                terminate(proc)


@pytest.fixture(scope="module")
def client(fake_mesh: Mesh) -> openai.OpenAI:
    """The openai SDK against the module's fake mesh (no retries: errors show as they are)."""
    return openai.OpenAI(base_url=fake_mesh.http, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def fake_mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        mesh.workers = [mesh.start_worker("w0"), mesh.start_worker("w1")]
        mesh.start_gateway()
        yield mesh


def _wait_healthy(base_url: str) -> None:
    import time

    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("gateway never became healthy")
