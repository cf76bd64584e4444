"""Metrics on every service, Prometheus service discovery and `kvmesh status`, over a
mesh of real processes (fake engines)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import grpc
import httpx
import openai
import pytest

from kvmesh.core.net import free_port
from kvmesh.v1 import inference_pb2, inference_pb2_grpc
from tests.prom import Scrape

from .conftest import Mesh

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Count the tokens."}]


def _gateway(mesh: Mesh) -> str:
    return mesh.http.removeprefix("http://").removesuffix("/v1")


def test_gateway_metrics_after_traffic(fake_mesh: Mesh, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                        stream=True))
    client.completions.create(model=MODEL, prompt="one two three", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)

    async def grpc_chat() -> None:
        async with grpc.aio.insecure_channel(fake_mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            async for _ in stub.Chat(inference_pb2.ChatRequest(
                    model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                    sampling=inference_pb2.SamplingOptions(max_tokens=3))):
                pass

    asyncio.run(grpc_chat())

    s = Scrape.of(_gateway(fake_mesh))
    chat = "/v1/chat/completions"
    assert s.total("kvmesh_gateway_requests_total", model=MODEL, endpoint=chat,
                   status="200") == 2
    assert s.total("kvmesh_gateway_requests_total", model=MODEL, endpoint="/v1/completions",
                   status="200") == 1
    assert s.total("kvmesh_gateway_requests_total", model="other", endpoint=chat,
                   status="404") == 1
    assert s.total("kvmesh_gateway_requests_total", endpoint=chat, status="400") == 1
    assert s.total("kvmesh_gateway_requests_total", model=MODEL, endpoint="grpc:Chat",
                   status="OK") == 1
    assert s.total("kvmesh_gateway_errors_total", type="not_found_error") == 1
    assert s.total("kvmesh_gateway_errors_total", type="invalid_request_error") == 1
    assert s.total("kvmesh_gateway_time_to_first_token_seconds_count", model=MODEL) == 4
    assert s.total("kvmesh_gateway_inter_token_latency_seconds_count", model=MODEL) >= 4
    assert s.total("kvmesh_gateway_e2e_request_latency_seconds_count", endpoint=chat) == 2
    assert s.total("kvmesh_gateway_generation_tokens_total", model=MODEL) >= 4 + 4 + 3 + 3
    assert s.total("kvmesh_gateway_prompt_tokens_total", model=MODEL) > 20
    assert s.total("kvmesh_gateway_in_flight_streams") == 0
    assert s.has("kvmesh_gateway_auth_failures_total") or \
        "kvmesh_gateway_auth_failures" in s.families
    assert s.total("process_resident_memory_bytes") > 0


def test_router_metrics_workers_by_state(fake_mesh: Mesh, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="route me", max_tokens=1)
    s = Scrape.of(fake_mesh.router_metrics)
    assert s.total("kvmesh_router_workers", role="both", state="ready") == 2
    assert s.total("kvmesh_router_workers", state="stale") == 0
    for worker in ("w0", "w1"):
        assert s.has("kvmesh_router_worker_requests", worker=worker, kind="in_flight")
        assert s.has("kvmesh_router_worker_kv_usage", worker=worker)
    assert s.total("kvmesh_router_decisions_total") >= 1


def test_prometheus_service_discovery(fake_mesh: Mesh) -> None:
    groups = httpx.get(f"http://{_gateway(fake_mesh)}/sd/prometheus", timeout=5).json()
    by_service: dict[str, list[dict]] = {}
    for group in groups:
        by_service.setdefault(group["labels"]["kvmesh_service"], []).append(group)
    assert by_service["gateway"][0]["targets"] == [_gateway(fake_mesh)]
    assert by_service["router"][0]["targets"] == [fake_mesh.router_metrics]
    workers = {g["labels"]["kvmesh_worker"]: g["targets"][0] for g in by_service["worker"]}
    assert workers == {w["worker_id"]: w["metrics"] for w in fake_mesh.workers}
    # Every target answers a scrape.
    for group in groups:
        assert Scrape.of(group["targets"][0]).samples


def test_status_table(fake_mesh: Mesh) -> None:
    env = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", "status", "--router", fake_mesh.router],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    ).stdout
    for text in ("w0", "w1", MODEL, "adapters", "cache hit rate", "KV usage", "models",
                 fake_mesh.workers[0]["metrics"]):
        assert text in out, out


def test_status_asks_the_next_router_replica_when_one_is_down(fake_mesh: Mesh) -> None:
    dead = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", "status", "--json", "--router",
         f"{dead},{fake_mesh.router}"],
        capture_output=True, text=True, timeout=60, check=True)
    body = json.loads(done.stdout)
    assert body["router"] == fake_mesh.router and body["unreachable_routers"] == [dead]
    assert {w["worker"]["worker_id"] for w in body["workers"]} == {"w0", "w1"}
    assert f"router {dead} unreachable" in done.stderr
