"""deploy/grafana: the dashboard JSON and its provisioning files are well-formed."""

from __future__ import annotations

import pytest
import yaml

from tests.grafana import (
    DASHBOARD,
    PROVISIONING,
    exported_names,
    expressions,
    load_dashboard,
    metric_names,
)

pytestmark = pytest.mark.unit


def test_dashboard_structure() -> None:
    d = load_dashboard()
    for key in ("uid", "title", "panels", "schemaVersion", "templating", "time"):
        assert key in d
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Gateway", "Router", "Workers (vLLM engine metrics)",
                    "Prefill/decode (KV transfer)"]
    for p in d["panels"]:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]
            assert metric_names(t["expr"]), t["expr"]
    # No two panels overlap.
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def test_dashboard_covers_every_service() -> None:
    names = set().union(*(metric_names(e) for e in expressions(load_dashboard())))
    for wanted in ("kvmesh_gateway_time_to_first_token_seconds_bucket",
                   "kvmesh_gateway_inter_token_latency_seconds_bucket",
                   "kvmesh_gateway_auth_failures_total", "kvmesh_router_decisions_total",
                   "kvmesh_router_kv_event_lag_seconds_bucket", "kvmesh_router_workers",
                   "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
                   "vllm:num_requests_running", "vllm:nixl_bytes_transferred_sum",
                   "vllm:nixl_xfer_time_seconds_bucket", "kvmesh_gateway_pd_requests_total"):
        assert wanted in names


def test_provisioning_points_at_the_dashboard() -> None:
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "kvmesh.yaml").read_text())
    provider = dashboards["providers"][0]
    assert dashboards["apiVersion"] == 1 and provider["type"] == "file"
    assert provider["options"]["path"]
    assert DASHBOARD.parent.name == "dashboards" and DASHBOARD.exists()
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, worker) (rate(vllm:e2e_request_latency_'
            'seconds_bucket{model_name="m"}[$__rate_interval]))) / sum(kvmesh_x_total)')
    assert metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket", "kvmesh_x_total"}
    assert metric_names("sum by (kvmesh_worker) (vllm:num_requests_running) > 2") == {
        "vllm:num_requests_running"}
    text = ("# HELP a_total x\n# TYPE a_total counter\n# TYPE h histogram\n"
            'h_bucket{le="1.0"} 1.0\nb{x="1"} 2.0\n')
    assert exported_names(text) == {"a_total", "h", "h_bucket", "h_sum", "h_count", "b"}


def test_prometheus_config_discovers_through_the_gateway() -> None:
    config = yaml.safe_load((PROVISIONING.parent.parent / "prometheus" / "prometheus.yml")
                            .read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["http_sd_configs"]
    assert sd["url"].endswith("/sd/prometheus")
    assert "static_configs" not in job  # every target comes from discovery
