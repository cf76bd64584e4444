"""Gateway token timings, router worker gauges and service discovery (pure)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import generate_latest

from kvmesh.gateway import metrics as gateway_metrics
from kvmesh.gateway.discovery import prometheus_targets
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.pipeline import ChoiceDelta, Finished
from kvmesh.gateway.schemas import Usage
from kvmesh.router.metrics import RouterMetrics, WorkerSample
from kvmesh.v1 import common_pb2
from tests.prom import Scrape

pytestmark = pytest.mark.unit


def _scrape(registry) -> Scrape:  # type: ignore[no-untyped-def]
    return Scrape(generate_latest(registry).decode())


async def _events(gaps: list[float]) -> AsyncIterator[ChoiceDelta | Finished]:
    for gap in gaps:
        await asyncio.sleep(gap)
        yield ChoiceDelta(0, "x", [7])
    yield ChoiceDelta(0, "", [], "stop")
    yield Finished(Usage(prompt_tokens=40, completion_tokens=len(gaps), total_tokens=40 + len(gaps),
                         prompt_tokens_details={"cached_tokens": 32}))


async def test_generation_timings_and_usage() -> None:
    import time

    m = GatewayMetrics(known_models=lambda: ["m"])
    started = time.perf_counter()
    seen = []
    async for event in m.observe_generation(_events([0.05, 0.02, 0.02]), "m", "/v1/x", started):
        seen.append(event)
        if len(seen) == 1:  # while streaming, the generation counts as in flight
            assert _scrape(m.registry).total("kvmesh_gateway_in_flight_streams") == 1
    s = _scrape(m.registry)
    assert len(seen) == 5
    assert s.total("kvmesh_gateway_in_flight_streams") == 0
    assert s.total("kvmesh_gateway_time_to_first_token_seconds_count", model="m") == 1
    assert s.total("kvmesh_gateway_time_to_first_token_seconds_sum", model="m") >= 0.05
    assert s.total("kvmesh_gateway_inter_token_latency_seconds_count", model="m") == 2
    assert s.total("kvmesh_gateway_inter_token_latency_seconds_sum", model="m") >= 0.04
    assert s.total("kvmesh_gateway_e2e_request_latency_seconds_count", endpoint="/v1/x") == 1
    assert s.total("kvmesh_gateway_prompt_tokens_total", model="m") == 40
    assert s.total("kvmesh_gateway_cached_prompt_tokens_total", model="m") == 32
    assert s.total("kvmesh_gateway_generation_tokens_total", model="m") == 3


async def test_unknown_models_share_one_label() -> None:
    m = GatewayMetrics(known_models=lambda: ["m"])
    async for _ in m.observe_generation(_events([0]), "made-up-by-a-client", "/v1/x", 0.0):
        pass
    s = _scrape(m.registry)
    assert s.total("kvmesh_gateway_generation_tokens_total", model="other") == 1
    assert not s.has("kvmesh_gateway_generation_tokens_total", model="made-up-by-a-client")


def test_auth_failure_hook_counts_on_the_active_metrics() -> None:
    m = GatewayMetrics()
    gateway_metrics.activate(m)
    gateway_metrics.record_auth_failure("invalid_key")
    gateway_metrics.record_auth_failure("invalid_key")
    assert _scrape(m.registry).total("kvmesh_gateway_auth_failures_total",
                                     reason="invalid_key") == 2


def test_router_worker_gauges_by_state() -> None:
    m = RouterMetrics()
    workers = [
        WorkerSample("a", "both", "ready", 2, 1, 3, 0.25, 0.5, 10),
        WorkerSample("b", "both", "stale", 0, 0, 0, 0.0, None, 0),
        WorkerSample("c", "prefill", "ready", 1, 0, 1, 0.1, 0.9, 4),
    ]
    m.track(lambda: 14, lambda: workers)
    s = _scrape(m.registry)
    assert s.total("kvmesh_router_workers", role="both", state="ready") == 1
    assert s.total("kvmesh_router_workers", role="both", state="stale") == 1
    assert s.total("kvmesh_router_workers", role="prefill", state="ready") == 1
    assert s.total("kvmesh_router_workers") == 3
    assert s.total("kvmesh_router_worker_requests", worker="a", kind="running") == 2
    assert s.total("kvmesh_router_worker_requests", worker="a", kind="in_flight") == 3
    assert s.total("kvmesh_router_worker_kv_usage", worker="a") == 0.25
    assert s.total("kvmesh_router_worker_cache_hit_rate", worker="c") == 0.9
    assert not s.has("kvmesh_router_worker_cache_hit_rate", worker="b")  # never reported
    assert s.total("kvmesh_router_index_blocks") == 14


def test_prometheus_sd_lists_gateway_router_and_workers() -> None:
    workers = [
        common_pb2.WorkerInfo(worker_id="w1", model="m", metrics_endpoint="h:3",
                              role=common_pb2.WORKER_ROLE_DECODE),
        common_pb2.WorkerInfo(worker_id="w0", model="m", metrics_endpoint="h:2"),
        common_pb2.WorkerInfo(worker_id="plain", model="m"),  # no metrics endpoint
    ]
    groups = prometheus_targets("h:0", "h:1", workers)
    assert [g["targets"] for g in groups] == [["h:0"], ["h:1"], ["h:2"], ["h:3"]]
    assert [g["labels"]["kvmesh_service"] for g in groups] == [
        "gateway", "router", "worker", "worker"]
    assert groups[3]["labels"] == {"kvmesh_service": "worker", "kvmesh_worker": "w1",
                                   "kvmesh_model": "m", "kvmesh_role": "decode"}
    assert prometheus_targets("h:0", "", []) == [
        {"targets": ["h:0"], "labels": {"kvmesh_service": "gateway"}}]
