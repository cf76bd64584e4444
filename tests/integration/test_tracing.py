"""One request through a traced mesh (real processes, fake engines) yields one trace
with spans from the gateway, the router and the worker, joined by W3C traceparent."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.otlp_collector import OtlpCollector, ReceivedSpan

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
CLIENT_SPAN = "00f067aa0ba902b7"  # the caller's span in the traceparent headers below
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 3}


@contextlib.contextmanager
def _traced(workers: dict[str, tuple[str, ...]], *router_flags: str,
            ) -> Iterator[tuple[Mesh, OtlpCollector]]:
    """Router, workers (name -> extra flags) and gateway, all tracing to one collector."""
    collector = OtlpCollector().start()
    trace_flags = ["--trace", "otlp", "--otlp-endpoint", collector.endpoint, "--log-json"]
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export every 100 ms (tests only)
    try:
        with running_mesh("kvm-tr-") as mesh:
            mesh.router = start_router(mesh, "router", *trace_flags, *router_flags)
            mesh.workers = [mesh.start_worker(name, *trace_flags, *extra)
                            for name, extra in workers.items()]
            mesh.start_gateway(*trace_flags)
            yield mesh, collector
    finally:
        collector.stop()
        if saved is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


@pytest.fixture(scope="module")
def traced_mesh(model_dir: Path) -> Iterator[tuple[Mesh, OtlpCollector]]:
    with _traced({"w0": ()}) as traced:
        yield traced


@pytest.fixture(scope="module")
def traced_pd_mesh(model_dir: Path) -> Iterator[tuple[Mesh, OtlpCollector]]:
    flags = ("--block-size", "32")
    with _traced({"p0": ("--role", "prefill", *flags), "d0": ("--role", "decode", *flags)},
                 "--disaggregation", "always") as traced:
        yield traced


def _wait_for_trace(collector: OtlpCollector, trace_id: str,
                    services: set[str]) -> list[ReceivedSpan]:
    """The trace once every service reported and it is connected: each span's parent has
    arrived too (processes export in batches, so a child can land before its parent)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = collector.trace(trace_id)
        ids = {s.span_id for s in spans}
        dangling = {s.parent_span_id for s in spans if s.parent_span_id} - ids
        if services <= {s.service for s in spans} and any(
                s.name == "detokenize" for s in spans) and dangling <= {CLIENT_SPAN}:
            return spans
        time.sleep(0.1)
    return collector.trace(trace_id)


def test_one_request_one_connected_trace(traced_mesh: tuple[Mesh, OtlpCollector]) -> None:
    mesh, collector = traced_mesh
    # The client's own trace context is honoured (as when Envoy or an app starts it).
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = httpx.post(mesh.http + "/chat/completions", json=BODY, timeout=30, headers={
        "traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
    assert reply.status_code == 200
    spans = _wait_for_trace(collector, trace_id,
                            {"kvmesh-gateway", "kvmesh-router", "kvmesh-worker"})
    by_name = {(s.service, s.name): s for s in spans}

    names = set(by_name)
    for expected in [
        ("kvmesh-gateway", "POST /v1/chat/completions"),
        ("kvmesh-gateway", "tokenize"),
        ("kvmesh-gateway", "route"),
        ("kvmesh-gateway", "/kvmesh.v1.Router/Route"),
        ("kvmesh-router", "/kvmesh.v1.Router/Route"),
        ("kvmesh-router", "decide"),
        ("kvmesh-gateway", "generate"),
        ("kvmesh-gateway", "/vllm.grpc.engine.VllmEngine/Generate"),
        ("kvmesh-worker", "/vllm.grpc.engine.VllmEngine/Generate"),
        ("kvmesh-gateway", "detokenize"),
    ]:
        assert expected in names, sorted(names)
    # Parent links cross the process boundaries: gateway client span -> server span.
    ids = {s.span_id: s for s in spans}
    worker = by_name[("kvmesh-worker", "/vllm.grpc.engine.VllmEngine/Generate")]
    client = ids[worker.parent_span_id]
    assert (client.service, client.name) == ("kvmesh-gateway",
                                             "/vllm.grpc.engine.VllmEngine/Generate")
    assert ids[client.parent_span_id].name == "generate"
    decide = by_name[("kvmesh-router", "decide")]
    assert decide.attributes["kvmesh.worker"] == "w0"
    assert ids[ids[decide.parent_span_id].parent_span_id].service == "kvmesh-gateway"
    # Only the request path is traced: no heartbeat, probe or KV-event spans.
    assert not [s for s in collector.spans if "Heartbeat" in s.name or "GetLoads" in s.name
                or "SubscribeKvEvents" in s.name]


def test_json_logs_carry_request_and_trace_ids(traced_mesh: tuple[Mesh, OtlpCollector]) -> None:
    mesh, _ = traced_mesh
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    reply = httpx.post(mesh.http + "/chat/completions", json=BODY, timeout=30, headers={
        "traceparent": f"00-{trace_id}-b7ad6b7169203331-01", "x-request-id": "req-log-1"})
    assert reply.status_code == 200
    deadline = time.monotonic() + 10
    line: dict = {}
    while time.monotonic() < deadline and not line:
        for text in (mesh.dir / "gateway.log").read_text().splitlines():
            if text.startswith("{") and '"req-log-1"' in text:
                entry = json.loads(text)
                if entry.get("message", "").startswith("request done"):
                    line = entry
        time.sleep(0.1)
    assert line, (mesh.dir / "gateway.log").read_text()[-3000:]
    assert line["level"] == "INFO" and line["service"] == "gateway"
    assert line["request_id"] == "req-log-1" and line["trace_id"] == trace_id
    assert line["status"] == 200 and line["endpoint"] == "/v1/chat/completions"
    assert line["model"] == MODEL and line["completion_tokens"] == 3
    assert line["prompt_tokens"] > 0 and line["latency_s"] > 0 and line["ttft_s"] > 0


def test_disaggregated_request_traces_prefill_and_decode(
        traced_pd_mesh: tuple[Mesh, OtlpCollector]) -> None:
    mesh, collector = traced_pd_mesh
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    body = {"model": MODEL, "prompt": " ".join(["long prompt"] * 60), "max_tokens": 3}
    reply = httpx.post(mesh.http + "/completions", json=body, timeout=30, headers={
        "traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
    assert reply.status_code == 200
    spans = _wait_for_trace(collector, trace_id,
                            {"kvmesh-gateway", "kvmesh-router", "kvmesh-worker"})
    ids = {s.span_id: s for s in spans}
    prefill = next(s for s in spans if s.name == "prefill")
    decode = next(s for s in spans if s.name == "decode")
    assert prefill.attributes["kvmesh.worker"] == "p0" and prefill.attributes["kvmesh.kv_handover"]
    assert decode.attributes["kvmesh.worker"] == "d0"
    assert ids[prefill.parent_span_id].name == ids[decode.parent_span_id].name == \
        "POST /v1/completions"
    # Both legs reach their worker: one server span under each gateway leg.
    worker_spans = [s for s in spans if s.service == "kvmesh-worker"]
    legs = {ids[ids[s.parent_span_id].parent_span_id].name for s in worker_spans}
    assert legs == {"prefill", "decode"}
    decide = next(s for s in spans if s.name == "decide")
    assert decide.attributes["kvmesh.route.disaggregated"] is True


def test_grpc_inference_request_is_traced(traced_mesh: tuple[Mesh, OtlpCollector]) -> None:
    import asyncio

    import grpc

    from kvmesh.v1 import inference_pb2, inference_pb2_grpc

    mesh, collector = traced_mesh
    trace_id = "6bf92f3577b34da6a3ce929d0e0e4738"
    metadata = (("traceparent", f"00-{trace_id}-{CLIENT_SPAN}-01"),)

    async def chat(model: str) -> list[inference_pb2.GenerationResponse]:
        async with grpc.aio.insecure_channel(mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.ChatRequest(
                model=model, messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                sampling=inference_pb2.SamplingOptions(max_tokens=2))
            return [r async for r in stub.Chat(request, metadata=metadata)]

    assert asyncio.run(chat(MODEL))[-1].usage.completion_tokens == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:  # errors keep their status when traced
        asyncio.run(chat("no-such-model"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    spans = _wait_for_trace(collector, trace_id,
                            {"kvmesh-gateway", "kvmesh-router", "kvmesh-worker"})
    names = {(s.service, s.name) for s in spans}
    assert ("kvmesh-gateway", "/kvmesh.v1.Inference/Chat") in names
    assert {("kvmesh-gateway", "tokenize"), ("kvmesh-router", "decide"),
            ("kvmesh-worker", "/vllm.grpc.engine.VllmEngine/Generate")} <= names
