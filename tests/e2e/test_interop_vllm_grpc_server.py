"""kvmesh's router and gateway in front of vLLM's own, unchanged gRPC server."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file

from .conftest import MODEL, PlainVllm

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway_over_plain_vllm(plain_vllm: PlainVllm) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="kvm-io-") as d:
        work = Path(d)
        procs = []
        try:
            router = spawn_module(
                "kvmesh.router",
                ["--port", "0", "--metrics-port", "0", "--worker", plain_vllm.endpoint,
                 "--ready-file", str(work / "router.ready")],
                work / "router.log",
            )
            procs.append(router)
            address = wait_ready_file(work / "router.ready", 30, router, "router")["grpc"]
            gateway = spawn_module(
                "kvmesh.gateway",
                ["--router", address, "--port", "0", "--grpc-port", "0",
                 "--ready-file", str(work / "gateway.ready")],
                work / "gateway.log",
            )
            procs.append(gateway)
            yield wait_ready_file(work / "gateway.ready", 60, gateway, "gateway")["http"]
        finally:
            for proc in procs:
                terminate(proc)


def test_chat_through_plain_vllm_worker(gateway_over_plain_vllm: str) -> None:
    import time

    client = openai.OpenAI(base_url=gateway_over_plain_vllm, api_key="x", max_retries=0)
    deadline = time.monotonic() + 60
    while not client.models.list().data and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user",
                 "content": "What is the capital of France? Answer in one sentence."}]
    reply = None
    while time.monotonic() < deadline:
        try:
            reply = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=30, temperature=0)
            break
        except openai.APIStatusError as exc:  # tokenizer still loading
            assert exc.status_code == 503
            time.sleep(0.2)
    assert reply is not None and "Paris" in reply.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        reply.choices[0].message.content)
