"""`kvmesh deploy ray` against a real two-node Ray cluster on 127.0.0.1.

The test starts the cluster itself (`ray start --block`, so each node's processes stop
with the `ray start` process, which is ended by PID): a head node, and a second node
that alone offers the custom resource `kvmesh_pool`. Workers that ask for it must land
on the second node, reserved as one placement group; a mesh the cluster cannot hold
fails at once with what it asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvmesh.core.net import free_port
from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports, below the ephemeral range (the nodes bind them later)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def node_ports() -> list[str]:
    low = free_ports(1)[0]
    # The components' ports outside the worker port range (Ray refuses an overlap).
    ports: list[int] = []
    while len(ports) < 7:
        ports += [p for p in free_ports(7 - len(ports))
                  if not low <= p <= low + 40 and p not in ports]
    manager, objects, client, agent, grpc_agent, metrics, runtime_env = ports
    return ["--node-manager-port", str(manager), "--object-manager-port", str(objects),
            "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(grpc_agent), "--metrics-export-port", str(metrics),
            "--runtime-env-agent-port", str(runtime_env),
            "--min-worker-port", str(low), "--max-worker-port", str(low + 40)]


VIEW = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
groups = ray.util.placement_group_table().values()
print(json.dumps({"available": ray.available_resources(), "groups": [
    {"name": g["name"], "state": g["state"], "strategy": g["strategy"]} for g in groups]}))
"""


def cluster_view(address: str) -> dict[str, Any]:
    """The cluster's free resources and placement groups, asked by a separate driver."""
    out = subprocess.run([sys.executable, "-c", VIEW, address], capture_output=True,
                         text=True, timeout=120, env=ray_env(), check=True)
    view: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return view


def ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("ray")
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--block"]
    head = spawn([RAY, "start", "--head", "--port", str(port), "--num-cpus", "2",
                  "--include-dashboard", "false", *common, *node_ports()], logs / "head.log")
    second = None
    try:
        second = spawn([RAY, "start", "--address", address, "--num-cpus", "2", "--resources",
                        json.dumps({"kvmesh_pool": 2}), *common, *node_ports()],
                       logs / "second.log")
        deadline = time.monotonic() + 120
        while cluster_view(address)["available"].get("kvmesh_pool") != 2:
            alive = head.poll() is None and second.poll() is None
            assert alive and time.monotonic() < deadline, "".join(
                (logs / name).read_text()[-2000:] for name in ("head.log", "second.log"))
            time.sleep(1)
        yield address
    finally:
        for proc in (second, head):
            if proc is not None:
                terminate(proc, 60)


def spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A `ray start --block` node: its Ray processes end when this process is ended."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ray_env())


def deploy(tmp_path: Path, address: str, config: str) -> subprocess.Popen[bytes]:
    (tmp_path / "mesh.yaml").write_text(config)
    return spawn_module("kvmesh.cli", [
        "deploy", "ray", "--address", address, "--config", str(tmp_path / "mesh.yaml"),
        "--engine-kind", "fake", "--no-embeddings", "--port", "0",
        "--state-file", str(tmp_path / "up.json")], tmp_path / "deploy.log", env=ray_env())


def test_workers_land_on_the_node_with_their_resource_as_one_group(
        cluster: str, tmp_path: Path, model_dir: Path) -> None:
    proc = deploy(tmp_path, cluster, "workers: 2\nplacement: PACK\n"
                  "worker: {num_cpus: 0.5, resources: {kvmesh_pool: 1}}\n")
    try:
        state = wait_ready_file(tmp_path / "up.json", 240, proc, "kvmesh deploy ray")
        assert len(state["workers"]) == 2
        view = cluster_view(cluster)
        # Both units of the resource only the second node has are held by the workers.
        assert view["available"].get("kvmesh_pool", 0) == 0
        assert {"name": "kvmesh-workers", "state": "CREATED", "strategy": "PACK"} in view[
            "groups"]
        down = subprocess.run([sys.executable, "-m", "kvmesh.cli", "down", "--state-file",
                               str(tmp_path / "up.json")], capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert proc.wait(timeout=30) == 0
        after = cluster_view(cluster)
        assert after["available"].get("kvmesh_pool") == 2
        assert not any(g["state"] == "CREATED" for g in after["groups"])
    finally:
        terminate(proc, 60)
        print((tmp_path / "deploy.log").read_text()[-4000:])


def test_a_mesh_the_cluster_cannot_hold_fails_at_once(
        cluster: str, tmp_path: Path, model_dir: Path) -> None:
    proc = deploy(tmp_path, cluster, "workers: 3\nplacement: STRICT_PACK\n"
                  "startup_timeout_s: 15\n"
                  "worker: {num_cpus: 0.5, resources: {kvmesh_pool: 1}}\n")
    try:
        assert proc.wait(timeout=180) == 1
        log = (tmp_path / "deploy.log").read_text()
        assert "cannot place 3 worker(s) STRICT_PACK" in log and "kvmesh_pool" in log
        assert "Traceback" not in log
        assert cluster_view(cluster)["available"].get("kvmesh_pool") == 2
    finally:
        terminate(proc, 60)


def _router_workers(router: str) -> list[Any]:
    import asyncio

    import grpc

    from kvmesh.v1 import router_pb2, router_pb2_grpc

    async def ask() -> list[Any]:
        async with grpc.aio.insecure_channel(router) as channel:
            reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=10)
            return list(reply.workers)

    return asyncio.run(ask())


def _route(router: str, prompts: list[bytes], tag: str) -> list[str]:
    import asyncio

    import grpc

    from kvmesh.v1 import router_pb2, router_pb2_grpc

    async def ask() -> list[str]:
        async with grpc.aio.insecure_channel(router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            chosen = []
            for i, packed in enumerate(prompts):
                decision = await stub.Route(router_pb2.RouteRequest(
                    request_id=f"{tag}{i}", model="SmolLM2-135M-Instruct",
                    packed_token_ids=packed), timeout=10)
                chosen.append(decision.worker.worker_id)
            return chosen

    return asyncio.run(ask())


def test_a_dp_gang_starts_as_one_group_spreads_requests_and_goes_as_one(
        cluster: str, tmp_path: Path, model_dir: Path) -> None:
    """data_parallel_size 2 + expert parallelism (fake engine): both ranks start in one
    STRICT_PACK placement group of their own, register as one DP group, take requests
    in turn (a prompt's prefix staying on its rank), and when one rank dies the router
    drops the whole gang while the other rank still runs."""
    import random
    import signal

    import numpy as np

    proc = deploy(tmp_path, cluster, (
        "workers: 1\nrouter: {lease_ttl_s: 3, heartbeat_interval_s: 1}\n"
        "worker: {num_cpus: 0.5, engine: {data_parallel_size: 2, "
        "enable_expert_parallel: true, data_parallel_strategy: STRICT_PACK}}\n"))
    try:
        state = wait_ready_file(tmp_path / "up.json", 240, proc, "kvmesh deploy ray")
        ranks = sorted(state["workers"], key=lambda w: w["dp_rank"])
        assert [(w["dp_rank"], w["dp_size"]) for w in ranks] == [(0, 2), (1, 2)]
        group = ranks[0]["dp_group"]
        assert group and ranks[1]["dp_group"] == group
        assert {"name": group, "state": "CREATED", "strategy": "STRICT_PACK"} in cluster_view(
            cluster)["groups"]
        listed = _router_workers(state["router"])
        assert sorted((w.worker.dp_group, w.worker.dp_rank, w.worker.dp_size)
                      for w in listed) == [(group, 0, 2), (group, 1, 2)]

        rng = np.random.default_rng(0)
        prompts = [rng.integers(100, 40_000, 256, dtype=np.uint32).astype("<u4").tobytes()
                   for _ in range(12)]
        first = _route(state["router"], prompts, "a")
        assert set(first) == {w["worker_id"] for w in ranks}  # spread over both ranks
        again = random.Random(0).sample(range(12), 6)
        assert _route(state["router"], [prompts[i] for i in again], "b") == [
            first[i] for i in again]  # each prefix on its rank

        os.kill(ranks[1]["pid"], signal.SIGKILL)  # one rank of the gang dies
        dead = ranks[1]["worker_id"]
        deadline = time.monotonic() + 60
        while (dead in {w.worker.worker_id for w in _router_workers(state["router"])}
               and time.monotonic() < deadline):
            time.sleep(0.5)
        assert dead not in {w.worker.worker_id for w in _router_workers(state["router"])}
        # The whole gang went with it: rank 0, still running (and registering again on
        # its next heartbeat), is never routed to, as a gang serves whole or not at all.
        os.kill(ranks[0]["pid"], 0)
        with pytest.raises(grpc.RpcError):
            _route(state["router"], prompts[:1], "c")
    finally:
        subprocess.run([sys.executable, "-m", "kvmesh.cli", "down", "--state-file",
                        str(tmp_path / "up.json")], capture_output=True, timeout=120,
                       check=False)
        terminate(proc, 60)
        print((tmp_path / "deploy.log").read_text()[-4000:])
