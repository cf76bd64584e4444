"""Observability of a live `kvmesh up` (real vLLM): every service's /metrics found
through the gateway's Prometheus service discovery, with real values after traffic."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.grafana import (
    PD_ROW,
    exported_names,
    expressions,
    load_dashboard,
    metric_names,
    rows,
)
from tests.prom import Scrape

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e
LONG = [{"role": "user", "content": "Describe a lighthouse. " + "The sea is calm. " * 40}]


@pytest.fixture(scope="module")
def scrapes(kvmesh_up: UpProcess) -> dict[str, list[Scrape]]:
    """Traffic first (a repeated long prompt hits the prefix cache), then one scrape of
    every target service discovery lists, grouped by service."""
    client = openai.OpenAI(base_url=kvmesh_up.state["http"], api_key="unused", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=8, temperature=0)
    list(client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=8,
                                        temperature=0, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=LONG)
    base = kvmesh_up.state["http"].removesuffix("/v1")
    groups = httpx.get(base + "/sd/prometheus", timeout=10).json()
    by_service: dict[str, list[Scrape]] = {}
    for group in groups:
        service = group["labels"]["kvmesh_service"]
        if service == "worker" and group["labels"]["kvmesh_model"] != MODEL:
            service = "embedding_worker"  # kvmesh up serves all-MiniLM-L6-v2 too
        for target in group["targets"]:
            by_service.setdefault(service, []).append(Scrape.of(target))
    return by_service


def _total(scrapes: list[Scrape], name: str, **labels: str) -> float:
    return sum(s.total(name, **labels) for s in scrapes)


def test_discovery_lists_every_service(kvmesh_up: UpProcess,
                                       scrapes: dict[str, list[Scrape]]) -> None:
    assert len(scrapes["gateway"]) == 1 and len(scrapes["router"]) == 1
    assert len(scrapes["worker"]) == len(kvmesh_up.state["workers"]) == 2
    assert len(scrapes["embedding_worker"]) == len(kvmesh_up.state["embedding_workers"]) == 1


def test_worker_metrics_are_vllms_own(scrapes: dict[str, list[Scrape]]) -> None:
    workers = scrapes["worker"]
    for s in workers:  # every worker's engine registered its metrics in the Ray actor
        assert s.has("vllm:num_requests_running", model_name=MODEL)
        assert s.has("vllm:kv_cache_usage_perc")
    assert _total(workers, "vllm:request_success_total") >= 4
    assert _total(workers, "vllm:generation_tokens_total") >= 4 * 8
    assert _total(workers, "vllm:prompt_tokens_total") > 4 * 200
    assert _total(workers, "vllm:prefix_cache_queries_total") > 0
    assert _total(workers, "vllm:prefix_cache_hits_total") > 0  # the repeated prompt
    assert _total(workers, "vllm:time_to_first_token_seconds_count") >= 4
    assert _total(workers, "vllm:inter_token_latency_seconds_count") > 0


def test_gateway_metrics_have_real_values(scrapes: dict[str, list[Scrape]]) -> None:
    gw = scrapes["gateway"]
    assert _total(gw, "kvmesh_gateway_requests_total", model=MODEL,
                  endpoint="/v1/chat/completions", status="200") >= 4
    assert _total(gw, "kvmesh_gateway_requests_total", status="404") >= 1
    assert _total(gw, "kvmesh_gateway_errors_total", type="not_found_error") >= 1
    assert _total(gw, "kvmesh_gateway_time_to_first_token_seconds_sum", model=MODEL) > 0
    assert _total(gw, "kvmesh_gateway_inter_token_latency_seconds_count", model=MODEL) > 0
    assert _total(gw, "kvmesh_gateway_e2e_request_latency_seconds_count") >= 4
    assert _total(gw, "kvmesh_gateway_generation_tokens_total", model=MODEL) >= 4 * 8
    assert _total(gw, "kvmesh_gateway_cached_prompt_tokens_total", model=MODEL) > 0


def test_router_metrics_have_real_values(scrapes: dict[str, list[Scrape]]) -> None:
    router = scrapes["router"]
    assert _total(router, "kvmesh_router_decisions_total", policy="kv_aware") >= 4
    assert _total(router, "kvmesh_router_matched_prefix_tokens_sum") > 0
    assert _total(router, "kvmesh_router_kv_event_blocks_total", kind="stored") > 0
    assert _total(router, "kvmesh_router_kv_event_lag_seconds_count") > 0
    assert _total(router, "kvmesh_router_index_blocks") > 0
    assert _total(router, "kvmesh_router_workers", state="ready") == 3  # + embedding worker
    assert _total(router, "kvmesh_router_worker_cache_hit_rate") > 0


def test_dashboard_queries_resolve_against_the_scrape(
        scrapes: dict[str, list[Scrape]]) -> None:
    """Every metric every Grafana panel queries is exported by the live mesh (the P/D
    row's against a P/D mesh: tests/e2e/test_pd_nixl.py)."""
    exported = set().union(*(exported_names(s.text) for group in scrapes.values()
                             for s in group))
    dashboard = load_dashboard()
    aggregated_rows = set(rows(dashboard)) - {PD_ROW}
    for expr in expressions(dashboard, aggregated_rows):
        missing = metric_names(expr) - exported
        assert not missing, f"{expr}: {sorted(missing)} not exported"
