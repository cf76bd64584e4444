"""`kvmesh up --routers 2`: two router replicas, each fed every worker; the gateway
keeps serving when one is SIGKILLed; each replica snapshots its index into the run dir
(fake-engine workers in real Ray actors: run under /work/bin/vllm-slot)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from tests.router_client import list_workers

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


def test_up_with_two_router_replicas(tmp_path: Path, model_dir: Path) -> None:
    state_file = tmp_path / "up.json"
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_STATE_FILE"}
    up = spawn_module("kvmesh.cli", ["up", "--engine-kind", "fake", "--workers", "2",
                                     "--routers", "2", "--no-embeddings", "--port", "0",
                                     "--state-file", str(state_file)],
                      tmp_path / "up.log", env=env)
    try:
        state = wait_ready_file(state_file, 180, up, "kvmesh up")
        routers = state["routers"]
        assert len(routers) == 2 and state["router"] == routers[0]
        assert len(state["pids"]["routers"]) == 2
        workers = sorted(w["worker_id"] for w in state["workers"])
        for router in routers:  # every worker registered with every replica
            assert sorted(s.worker.worker_id for s in list_workers(router)) == workers

        os.kill(state["pids"]["routers"][0], signal.SIGKILL)
        for i in range(8):
            reply = httpx.post(f"{state['http']}/chat/completions", timeout=30, json={
                "model": MODEL, "max_tokens": 4,
                "messages": [{"role": "user", "content": f"after the kill {i}"}]})
            assert reply.status_code == 200, reply.text

        down = subprocess.run([sys.executable, "-m", "kvmesh.cli", "down", "--json",
                               "--state-file", str(state_file)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(timeout=30) == 0
        # The surviving replica wrote its snapshot on the way out, into the run dir.
        run_dir = Path(state["run_dir"])
        assert (run_dir / "router-snapshot-1.npz").exists(), sorted(
            p.name for p in run_dir.iterdir())
        assert json.loads((run_dir / "router-1.json").read_text())["snapshot_path"] == str(
            run_dir / "router-snapshot-1.npz")
    finally:
        terminate(up, 30)
