"""`kvmesh up` with mutual TLS for the whole mesh from one config section, and no
internal token anywhere in its environment: the mesh makes one and hands it to every
service (router, gateway, fake-engine workers in real Ray actors); requests flow,
`kvmesh status` dials the router with the mesh's certificate, a plaintext client is
refused, and the configs written for the children are readable by their owner only."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from tests.certs import make_pki

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


def test_kvmesh_up_runs_the_whole_mesh_over_mtls(tmp_path: Path, model_dir: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump({"security": {"tls": pki.tls()}}))
    env = {k: v for k, v in os.environ.items()
           if k not in ("KVMESH_STATE_FILE", "KVMESH_INTERNAL_TOKEN")}
    state_file = tmp_path / "up.json"
    up = spawn_module("kvmesh.cli", [
        "up", "--engine-kind", "fake", "--workers", "2", "--no-embeddings", "--port", "0",
        "--config", str(config), "--state-file", str(state_file)], tmp_path / "up.log", env=env)
    try:
        state = wait_ready_file(state_file, 180, up, "kvmesh up")
        reply = httpx.post(f"{state['http']}/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text

        status = subprocess.run(
            [sys.executable, "-m", "kvmesh.cli", "status", "--json", "--state-file",
             str(state_file)], env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        workers = json.loads(status.stdout)["workers"]
        assert len(workers) == 2  # both registered: the token reached the Ray actors

        async def plaintext_health() -> str:
            async with grpc.aio.insecure_channel(state["router"]) as channel:
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return "SERVING"

        assert asyncio.run(plaintext_health()) == "UNAVAILABLE"
        run_dir = Path(state["run_dir"])
        for written in ("router.json", "gateway-0.json"):
            assert stat.S_IMODE((run_dir / written).stat().st_mode) == 0o600
        assert "no internal token" not in (run_dir / "router.log").read_text()
    finally:
        terminate(up, 30)
        print((tmp_path / "up.log").read_text()[-3000:])
