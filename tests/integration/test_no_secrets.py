"""No secret leaves in logs, metrics or traces: a mesh (router, two fake-engine workers,
gateway; DEBUG JSON logs, OTLP tracing) runs with known API keys and a known internal
token, is sent right and wrong credentials over HTTP and gRPC, loses a worker (its
deregistration carries the token), and every log line, /metrics page and exported span
is then searched for the secrets."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.core.internal_auth import TOKEN_METADATA_KEY
from kvmesh.launch.procs import terminate
from kvmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc
from tests.otlp_collector import OtlpCollector

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
API_KEY = "sk-kvmesh-" + secrets.token_hex(12)
OTHER_KEY = "sk-second-" + secrets.token_hex(12)
WRONG_KEY = "sk-wrong-" + secrets.token_hex(12)
TOKEN = "itok-" + secrets.token_hex(12)
WRONG_TOKEN = "itok-wrong-" + secrets.token_hex(12)
SECRETS = {"API key": API_KEY, "second API key": OTHER_KEY, "wrong API key": WRONG_KEY,
           "internal token": TOKEN, "wrong internal token": WRONG_TOKEN}


@pytest.fixture(scope="module")
def secret_mesh(model_dir: Path) -> Iterator[tuple[Mesh, OtlpCollector]]:
    collector = OtlpCollector().start()
    flags = ["--trace", "otlp", "--otlp-endpoint", collector.endpoint, "--log-json",
             "--log-level", "DEBUG"]
    try:
        with pytest.MonkeyPatch.context() as patch, running_mesh("kvm-sec-") as mesh:
            patch.setenv("KVMESH_INTERNAL_TOKEN", TOKEN)
            patch.setenv("KVMESH_GATEWAY_API_KEYS", json.dumps([API_KEY, OTHER_KEY]))
            patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
            mesh.router = start_router(mesh, "router", *flags)
            mesh.workers = [mesh.start_worker(n, *flags) for n in ("w0", "w1")]
            mesh.start_gateway(*flags)
            yield mesh, collector
    finally:
        collector.stop()


def exercise(mesh: Mesh) -> None:
    """Right and wrong credentials on every door, streaming and not."""
    body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    chat = f"{mesh.http}/chat/completions"
    with httpx.Client(timeout=30) as http:
        for key, status in ((API_KEY, 200), (OTHER_KEY, 200), (WRONG_KEY, 401)):
            headers = {"Authorization": f"Bearer {key}"}
            assert http.post(chat, json=body, headers=headers).status_code == status
            assert http.post(chat, json={**body, "stream": True},
                             headers=headers).status_code == status
            assert http.get(f"{mesh.http}/models", headers=headers).status_code == status
        assert http.post(chat, json=body, headers={"Authorization": WRONG_KEY}).status_code == 401

    async def over_grpc() -> None:
        async with grpc.aio.insecure_channel(mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.ChatRequest(
                model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                sampling=inference_pb2.SamplingOptions(max_tokens=2))
            replies = [r async for r in stub.Chat(
                request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=30)]
            assert replies
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [r async for r in stub.Chat(
                    request, metadata=(("authorization", f"Bearer {WRONG_KEY}"),), timeout=30)]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(mesh.router) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await router_pb2_grpc.RouterStub(channel).RegisterWorker(
                    router_pb2.RegisterWorkerRequest(worker=common_pb2.WorkerInfo(
                        worker_id="x", endpoint="127.0.0.1:1")),
                    metadata=((TOKEN_METADATA_KEY, WRONG_TOKEN),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(over_grpc())


def test_no_secret_in_logs_metrics_or_traces(secret_mesh: tuple[Mesh, OtlpCollector]) -> None:
    mesh, collector = secret_mesh
    exercise(mesh)
    terminate(mesh.procs.pop("w1"))  # deregisters with the token on its way out
    deadline = time.monotonic() + 20
    services = {"kvmesh-gateway", "kvmesh-router", "kvmesh-worker"}
    while {s.service for s in collector.spans} < services:
        assert time.monotonic() < deadline, {s.service for s in collector.spans}
        time.sleep(0.2)

    with httpx.Client(timeout=10) as http:
        pages = {
            "gateway /metrics": http.get(mesh.http.removesuffix("/v1") + "/metrics").text,
            "router /metrics": http.get(f"http://{mesh.router_metrics}/metrics").text,
            "worker /metrics": http.get(f"http://{mesh.workers[0]['metrics']}/metrics").text,
        }
    time.sleep(0.5)  # the last spans' export (every 100 ms)
    artefacts = {
        **{f"log {p.name}": p.read_text() for p in mesh.dir.glob("*.log")},
        **pages,
        "trace exports": collector.raw.decode("utf-8", "replace"),
    }
    # What was searched is real: requests were logged, counted and traced.
    assert "registered" in artefacts["log router.log"]
    assert "deregistered" in artefacts["log router.log"] or "removed" in artefacts[
        "log router.log"]
    assert "kvmesh_gateway_requests_total" in pages["gateway /metrics"]
    assert len(artefacts["trace exports"]) > 1000
    leaks = [(what, name) for what, text in artefacts.items()
             for name, secret in SECRETS.items() if secret in text]
    assert leaks == [], f"secrets found: {leaks}"
