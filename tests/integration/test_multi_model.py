"""Several models in one mesh, on real processes and a real Ray (fake engines):
`kvmesh up --config` with two models, `kvmesh models add/remove` while it runs (the
gateway's /v1/models follows the router within 2 s, no restart), and
``kvmesh.build_app`` in-process with fractional CPUs that reach Ray as configured."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from kvmesh.launch.procs import pid_alive, spawn_module, terminate, wait_ready_file
from kvmesh.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

MESH = """
worker: {engine_kind: fake, fake_token_delay_s: 0.001}
embeddings: {workers: 0}
models:
  - model_id: smol-a
    source: embedded
    resources: {num_cpus: 0.5}
  - model_id: smol-b
    source: embedded
    engine: {max_model_len: 2048}
    resources: {num_cpus: 0.5}
    policy: round_robin
"""


def kvmesh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmesh.cli", *args], env=env,
                          capture_output=True, text=True, timeout=180)


class Watcher:
    """Polls the router's workers of one model and the gateway's /v1/models every
    20 ms, noting when each first shows (or stops showing) the model."""

    def __init__(self, router: str, http: str, model: str, present: bool) -> None:
        self.router, self.http, self.model, self.present = router, http, model, present
        self.router_at: float | None = None
        self.gateway_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.router) as channel, \
                httpx.AsyncClient(timeout=2) as client:
            stub = router_pb2_grpc.RouterStub(channel)
            while not self._stop.is_set():
                now = time.monotonic()
                if self.router_at is None:
                    reply = await stub.ListWorkers(
                        router_pb2.ListWorkersRequest(model=self.model), timeout=2)
                    if bool(reply.workers) == self.present:
                        self.router_at = now
                if self.gateway_at is None:
                    listed = (await client.get(self.http + "/models")).json()["data"]
                    if any(m["id"] == self.model for m in listed) == self.present:
                        self.gateway_at = now
                await asyncio.sleep(0.02)

    def lag(self, timeout_s: float = 10.0) -> float:
        """Seconds from the router's change to the gateway's."""
        deadline = time.monotonic() + timeout_s
        while (self.router_at is None or self.gateway_at is None) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout=5)
        assert self.router_at is not None and self.gateway_at is not None, (
            self.router_at, self.gateway_at)
        return self.gateway_at - self.router_at


def wait_free_cpus(expected: float, timeout_s: float = 15.0) -> float:
    """Ray's free CPUs once they reach ``expected`` (a killed actor's come back soon
    after, not at once)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if abs(free - expected) < 1e-6 or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


def chat(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    return str(reply.model)


def test_models_are_added_and_removed_while_the_mesh_runs(tmp_path: Path,
                                                          model_dir: Path) -> None:
    env = {**os.environ, "KVMESH_STATE_FILE": str(tmp_path / "up.json")}
    (tmp_path / "mesh.yaml").write_text(MESH)
    up = spawn_module("kvmesh.cli", ["up", "--config", str(tmp_path / "mesh.yaml"),
                                     "--port", "0"], tmp_path / "up.log", env=env)
    try:
        state = wait_ready_file(tmp_path / "up.json", 180, up, "kvmesh up")
        assert [m["model_id"] for m in state["models"]] == ["smol-a", "smol-b"]
        # Fractional CPUs as configured: what Ray granted each worker actor.
        assert [w["resources"] for w in state["workers"]] == [{"CPU": 0.5}, {"CPU": 0.5}]
        client = openai.OpenAI(base_url=state["http"], api_key="x", max_retries=0)
        cards = {m.id: m.model_extra["max_model_len"] for m in client.models.list().data}
        assert cards == {"smol-a": 4096, "smol-b": 2048}
        assert chat(client, "smol-a") == "smol-a" and chat(client, "smol-b") == "smol-b"
        status = json.loads(kvmesh(env, "status", "--json").stdout)
        assert {(s["worker"]["model"], s["worker"].get("routing_policy", "")) for s in
                status["workers"]} == {("smol-a", ""), ("smol-b", "round_robin")}

        (tmp_path / "c.yaml").write_text(
            "model_id: smol-c\nsource: embedded\nresources: {num_cpus: 0.25}\n")
        watch = Watcher(state["router"], state["http"], "smol-c", present=True)
        added = kvmesh(env, "models", "add", "--config", str(tmp_path / "c.yaml"), "--json")
        assert added.returncode == 0, added.stderr
        lag = watch.lag()
        print(f"added: the gateway listed smol-c {lag:.3f}s after the router")
        assert lag < 2.0
        assert json.loads(added.stdout)["model_id"] == "smol-c"
        assert chat(client, "smol-c") == "smol-c"
        state = json.loads((tmp_path / "up.json").read_text())  # the file follows
        assert [m["model_id"] for m in state["models"]] == ["smol-a", "smol-b", "smol-c"]
        assert state["workers"][-1]["resources"] == {"CPU": 0.25}
        listing = json.loads(kvmesh(env, "models", "list", "--json").stdout)
        assert [m["model_id"] for m in listing] == ["smol-a", "smol-b", "smol-c"]
        again = kvmesh(env, "models", "add", "--config", str(tmp_path / "c.yaml"))
        assert again.returncode == 1 and "already serves `smol-c`" in again.stderr

        gone_pid = state["workers"][0]["pid"]
        watch = Watcher(state["router"], state["http"], "smol-a", present=False)
        removed = kvmesh(env, "models", "remove", "smol-a")
        assert removed.returncode == 0, removed.stderr
        lag = watch.lag()
        print(f"removed: the gateway dropped smol-a {lag:.3f}s after the router")
        assert lag < 2.0
        with pytest.raises(openai.NotFoundError):
            chat(client, "smol-a")
        assert chat(client, "smol-b") == "smol-b"  # the rest serve on, nothing restarted
        assert not pid_alive(gone_pid)
        assert pid_alive(state["pids"]["gateway"]) and pid_alive(state["pids"]["router"])
        missing = kvmesh(env, "models", "remove", "smol-a")
        assert missing.returncode == 1 and "serves no model `smol-a`" in missing.stderr

        state = json.loads((tmp_path / "up.json").read_text())
        down = kvmesh(env, "down", "--json")
        assert down.returncode == 0 and json.loads(down.stdout)["alive"] == []
        assert not any(pid_alive(p) for p in state["pids"]["workers"])
    finally:
        terminate(up, 60)
        print((tmp_path / "up.log").read_text()[-4000:])


def pd_requests(http: str, mode: str) -> float:
    text = httpx.get(http.removesuffix("/v1") + "/metrics", timeout=5).text
    name = f'kvmesh_gateway_pd_requests_total{{mode="{mode}"}} '
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith(name)), 0.0)


def test_build_app_fractional_cpus_reach_ray(tmp_path: Path, model_dir: Path) -> None:
    """Two small models share one CPU: each actor holds its fraction of it in Ray's own
    accounting (x one worker at 0.5, y a prefill and a decode worker at 0.25), each
    model's requests take its own path (y disaggregated over its P/D pair, x whole on
    its worker), and a model added through the app takes exactly what it asks."""
    import ray

    import kvmesh

    config: dict[str, Any] = {
        "worker": {"engine_kind": "fake", "engine": {"block_size": 32}},
        "embeddings": {"workers": 0}, "gateway": {"port": 0, "grpc_port": 0},
        "router": {"metrics_port": 0, "disaggregation": "always"},
        "models": [{"model_id": "x", "resources": {"num_cpus": 0.5}},
                   {"model_id": "y", "resources": {"num_cpus": 0.25},
                    "workers": {"both": 0, "prefill": 1, "decode": 1}}],
    }
    cpus = float(os.cpu_count() or 1)
    with kvmesh.build_app(config, run_dir=tmp_path) as app:
        x, y = app.models()
        assert [w["resources"] for w in x.workers + y.workers] == [
            {"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}]
        assert [w["role"] for w in y.workers] == ["prefill", "decode"]
        assert wait_free_cpus(cpus - 1.0) == pytest.approx(cpus - 1.0)
        client = openai.OpenAI(base_url=app.addresses.http, api_key="x", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["x", "y"]
        split = pd_requests(app.addresses.http, "disaggregated")
        assert chat(client, "y") == "y"
        assert pd_requests(app.addresses.http, "disaggregated") == split + 1
        whole = pd_requests(app.addresses.http, "aggregated")
        assert chat(client, "x") == "x"
        assert pd_requests(app.addresses.http, "aggregated") == whole + 1

        pool = app.call(app.add_model(kvmesh.ModelConfig(
            model_id="z", resources={"num_cpus": 0.25})))
        assert pool.workers[0]["resources"] == {"CPU": 0.25}
        assert wait_free_cpus(cpus - 1.25) == pytest.approx(cpus - 1.25)
        app.call(app.remove_model("x"))
        assert wait_free_cpus(cpus - 0.75) == pytest.approx(cpus - 0.75)
        assert [p.model_id for p in app.models()] == ["y", "z"]
        assert chat(client, "z") == "z" and chat(client, "y") == "y"
    assert not ray.is_initialized()  # the app's own Ray went down with it
