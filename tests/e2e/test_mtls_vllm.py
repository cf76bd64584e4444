"""Mutual TLS with a real vLLM worker (`kvmesh up`, one eager CPU engine): the worker's
VllmEngine server takes only the mesh's certificate, and the router follows the
engine's real KV events over mTLS — its prefix index holds the prompt's blocks, and a
second request with the same prefix is served from the engine's cache."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.v1 import router_pb2, router_pb2_grpc
from tests.certs import Pki, make_pki

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e
PREFIX = "You are the archivist of the harbour library. " + " ".join(
    f"Rule {i}: cite shelf {i} and keep answers short." for i in range(40))


def stored_blocks(metrics: str) -> float:
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(f"http://{metrics}/metrics", timeout=5).text
        stored = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("kvmesh_router_kv_event_blocks_total")
                     and 'kind="stored"' in line)
        if stored > 0 or time.monotonic() > deadline:
            return stored
        time.sleep(0.2)


def _channel(pki: Pki, target: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=pki.key.read_bytes(),
        certificate_chain=pki.cert.read_bytes()))


async def _health(channel: grpc.aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_real_worker_events_and_requests_over_mtls(model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kvm-tls-") as d:
        workdir = Path(d)
        pki = make_pki(workdir / "pki")
        config = workdir / "mesh.yaml"
        config.write_text(yaml.safe_dump({"security": {"tls": pki.tls()}}))
        up = UpProcess(workdir, ("--workers", "1"),
                       ("--no-embeddings", "--config", str(config)))
        try:
            client = openai.OpenAI(base_url=up.state["http"], api_key="x", max_retries=0)
            messages = [{"role": "system", "content": PREFIX},
                        {"role": "user", "content": "Which shelf holds maps?"}]
            first = client.chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=4, temperature=0)
            assert first.usage.prompt_tokens > 256

            async def router_index() -> int:
                async with _channel(pki, up.state["router"]) as channel:
                    stub = router_pb2_grpc.RouterStub(channel)
                    deadline = time.monotonic() + 20
                    while True:
                        reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(),
                                                       timeout=5)
                        blocks = reply.workers[0].indexed_blocks
                        if blocks > 0 or time.monotonic() > deadline:
                            return blocks
                        await asyncio.sleep(0.2)

            blocks = first.usage.prompt_tokens // 32
            assert asyncio.run(router_index()) >= blocks - 1
            # The engine's own BlockStored events, not the router's speculative marks:
            # the SubscribeKvEvents stream works over mTLS.
            assert stored_blocks(up.state["router_metrics"]) >= blocks - 1
            messages[1]["content"] = "Which shelf holds letters?"
            second = client.chat.completions.create(model=MODEL, messages=messages,
                                                    max_tokens=4, temperature=0)
            cached = second.usage.prompt_tokens_details.cached_tokens
            assert cached >= 256, second.usage

            async def worker_refusals() -> tuple[str, str]:
                endpoint = up.state["workers"][0]["endpoint"]
                async with grpc.aio.insecure_channel(endpoint) as plain, \
                        _channel(pki, endpoint) as mesh:
                    return await _health(plain), await _health(mesh)

            assert asyncio.run(worker_refusals()) == ("UNAVAILABLE", "SERVING")
        except BaseException:
            up.dump()
            raise
        finally:
            up.interrupt()
