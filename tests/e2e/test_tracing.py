"""Tracing on a live `kvmesh up --trace otlp` (real vLLM in a Ray actor): one request is
one trace with spans from the gateway, the router and the worker actor."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.otlp_collector import OtlpCollector, ReceivedSpan

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e
SERVICES = {"kvmesh-gateway", "kvmesh-router", "kvmesh-worker"}


@pytest.fixture(scope="module")
def traced_up(model_dir: Path) -> Iterator[tuple[UpProcess, OtlpCollector]]:
    collector = OtlpCollector().start()
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with tempfile.TemporaryDirectory(prefix="kvm-tr-") as d:
        up = UpProcess(Path(d), ("--workers", "1", "--no-embeddings"), env=env, extra=(
            "--trace", "otlp", "--otlp-endpoint", collector.endpoint, "--log-json"))
        try:
            yield up, collector
        finally:
            up.interrupt()
            collector.stop()


def _request_trace(collector: OtlpCollector) -> list[ReceivedSpan]:
    """The spans of the (only) chat request's trace, once every service exported."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        roots = [s for s in collector.spans if s.name == "POST /v1/chat/completions"]
        for root in roots:
            spans = collector.trace(root.trace_id)
            if {s.service for s in spans} >= SERVICES and any(
                    s.name == "detokenize" for s in spans):
                return spans
        time.sleep(0.2)
    return []


def test_real_worker_span_joins_the_request_trace(
        traced_up: tuple[UpProcess, OtlpCollector]) -> None:
    up, collector = traced_up
    client = openai.OpenAI(base_url=up.state["http"], api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    spans = _request_trace(collector)
    assert spans, sorted({(s.service, s.name) for s in collector.spans})
    ids = {s.span_id: s for s in spans}
    worker = next(s for s in spans if s.service == "kvmesh-worker"
                  and s.name == "/vllm.grpc.engine.VllmEngine/Generate")
    # worker server span <- gateway client span <- gateway "generate" <- request span
    client_span = ids[worker.parent_span_id]
    assert client_span.service == "kvmesh-gateway"
    assert ids[client_span.parent_span_id].name == "generate"
    decide = next(s for s in spans if s.service == "kvmesh-router" and s.name == "decide")
    assert decide.attributes["kvmesh.route.policy"] == "kv_aware"
    assert decide.attributes["kvmesh.worker"] == up.state["workers"][0]["worker_id"]
    tokenize = next(s for s in spans if s.name == "tokenize")
    assert tokenize.attributes["kvmesh.prompt_tokens"] > 10

    # The gateway's JSON request line carries the same trace id.
    trace_id = worker.trace_id
    lines = [json.loads(line) for line in
             (Path(up.state["run_dir"]) / "gateway.log").read_text().splitlines()
             if line.startswith("{")]
    done = [e for e in lines if e.get("message", "").startswith("request done")]
    assert any(e.get("trace_id") == trace_id and e["completion_tokens"] > 0 for e in done)
