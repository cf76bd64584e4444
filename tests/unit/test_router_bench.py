"""`kvmesh bench router` end to end on a small index: every figure the docs quote is
produced, measured on the index sizes asked for, and against Ray's own tree."""

from __future__ import annotations

import gc

import pytest

from kvmesh.bench.router import run_router_bench

pytestmark = pytest.mark.unit


def test_router_bench_reports_every_figure() -> None:
    try:
        report = run_router_bench(blocks=40_000, ray_blocks=2_000, seed=3)
    finally:
        gc.unfreeze()  # the bench freezes the heap as the router does
    assert report["indexed_blocks"] == 40_000
    assert report["ingest_blocks_per_s"] > 0 and 0 < report["index_bytes_per_block"] < 1000
    assert set(report["decision_latency"]) == {"1024_tokens", "4096_tokens", "8192_tokens"}
    by_size = report["decision_latency_8k_by_indexed_blocks"]
    assert list(by_size) == ["10000", "40000"]
    assert by_size["40000"] == report["decision_latency"]["8192_tokens"]
    for stats in [*report["decision_latency"].values(), *by_size.values()]:
        assert 0 < stats["p50_us"] <= stats["p99_us"]
    versus = report["vs_ray_prefix_tree"]
    assert versus["indexed_blocks"] == 2_000 and versus["ray_prefix_match"]["p99_us"] > 0
    assert versus["kvmesh_p99_over_ray_p99"] == pytest.approx(
        versus["kvmesh_kv_aware_decision"]["p99_us"] / versus["ray_prefix_match"]["p99_us"],
        abs=1e-3)
