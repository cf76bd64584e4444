"""`kvmesh bench router --rpc` at a small size: a real router process restores the
index from the snapshot the benchmark wrote, follows a fleet of worker ids, and
answers batched and unbatched Route load from a process of its own."""

from __future__ import annotations

import pytest

from kvmesh.bench.router_rpc import run_router_rpc_bench

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("batch", [True, False])
def test_rpc_bench_routes_through_a_router_process(batch: bool) -> None:
    report = run_router_rpc_bench(blocks=20_000, fleets=(4,), concurrency=16,
                                  duration_s=1.5, prompt_tokens=2048, batch=batch)
    (fleet,) = report["fleets"]
    assert fleet["workers"] == 4 and fleet["indexed_blocks"] == 20_000
    for run in (fleet["saturated"], fleet["at_fixed_rate"]):
        assert run["errors"] == 0 and run["decisions"] > 50
        assert run["workers_chosen"] == 4
        assert run["decisions_per_router_cpu_s"] > 0 and run["p99_ms"] >= run["p50_ms"]
        assert ("RouteBatch" in run["mode"]) == batch
    if batch:
        assert fleet["saturated"]["mean_batch"] > 1  # concurrent calls shared round trips
