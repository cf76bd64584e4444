"""`kvmesh up` records where it runs; `kvmesh status` and `kvmesh down` find it without
flags (fake-engine workers in real Ray actors, everything on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.launch.procs import pid_alive, spawn_module, terminate, wait_ready_file
from kvmesh.launch.state import mesh_pids

pytestmark = pytest.mark.integration


def kvmesh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmesh.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_status_and_down_find_the_running_mesh(tmp_path: Path, model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_STATE_FILE"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # the default place, kept inside the test
    state_file = tmp_path / "kvmesh" / "up.json"
    up = spawn_module("kvmesh.cli", ["up", "--engine-kind", "fake", "--workers", "1",
                                     "--no-embeddings", "--port", "0"],
                      tmp_path / "up.log", env=env)
    try:
        state = wait_ready_file(state_file, 180, up, "kvmesh up")
        assert state["pid"] == up.pid

        status = kvmesh(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["router"] == state["router"] and report["mesh"]["pid"] == up.pid
        assert [w["worker"]["worker_id"] for w in report["workers"]] == [
            state["workers"][0]["worker_id"]]
        table = kvmesh(env, "status")
        assert table.returncode == 0 and "kvmesh workers (policy: kv_aware)" in table.stdout

        second = kvmesh(env, "up", "--engine-kind", "fake", "--no-embeddings", "--port", "0")
        assert second.returncode == 1 and "already running" in second.stderr

        down = kvmesh(env, "down", "--json")
        assert down.returncode == 0, down.stdout + down.stderr
        stopped = json.loads(down.stdout)
        assert stopped["forced"] == [] and stopped["alive"] == []
        assert set(stopped["stopped"]) == {p for p in mesh_pids(state) if p > 0}
        assert up.wait(timeout=30) == 0
        assert not any(pid_alive(p) for p in mesh_pids(state) if p > 0)
        assert not state_file.exists()

        gone = kvmesh(env, "status")
        assert gone.returncode == 1 and "no running kvmesh up" in gone.stderr
    finally:
        terminate(up, 30)
        print((tmp_path / "up.log").read_text()[-3000:])


def test_a_worker_that_does_not_start_in_time_is_named_with_its_log(
        tmp_path: Path, model_dir: Path) -> None:
    """A stuck engine start (here a fake engine told to take 120 s) ends `kvmesh up`
    after startup_timeout_s with which worker, its PID and the tail of its log, and
    nothing of the mesh left running."""
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_STATE_FILE"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    (tmp_path / "mesh.yaml").write_text(
        "startup_timeout_s: 8\nworker: {fake_start_delay_s: 120}\n")
    up = subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", "up", "--engine-kind", "fake", "--workers", "1",
         "--no-embeddings", "--port", "0", "--config", str(tmp_path / "mesh.yaml")],
        env=env, capture_output=True, text=True, timeout=150)
    assert up.returncode == 1, up.stdout + up.stderr
    assert "1 worker(s) not ready after 8 s (startup_timeout_s)" in up.stderr, up.stderr
    assert "worker 0 (both): pid " in up.stderr
    assert "fake engine loading for 120 s" in up.stderr  # the tail of the worker's own log
    assert "Traceback" not in up.stderr
    assert not (tmp_path / "kvmesh" / "up.json").exists()
