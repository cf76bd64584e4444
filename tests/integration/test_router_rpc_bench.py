"""`kvmesh bench router --rpc` at a small size: a real router process restores the
index from the snapshot the benchmark wrote, follows a fleet of worker ids, and
answers Route load from a process of its own: batches on a RouteStream, unary
RouteBatch calls and a Route call per request, in turns."""

from __future__ import annotations

import pytest

from kvmesh.bench.router_rpc import run_router_rpc_bench

pytestmark = pytest.mark.integration


def test_rpc_bench_routes_through_a_router_process() -> None:
    report = run_router_rpc_bench(blocks=20_000, fleets=(4,), concurrency=16,
                                  duration_s=1.5, rate=300, prompt_tokens=2048,
                                  transports=("stream", "batch", "route"))
    (fleet,) = report["fleets"]
    assert fleet["workers"] == 4 and fleet["indexed_blocks"] == 20_000
    assert [turn["transport"] for turn in fleet["runs"]] == ["stream", "batch", "route"]
    for turn in fleet["runs"]:
        for run in (turn["saturated"], turn["at_fixed_rate"]):
            assert run["errors"] == 0 and run["decisions"] > 50, run
            assert run["workers_chosen"] == 4 and run["transport"] == turn["transport"]
            assert run["decisions_per_router_cpu_s"] > 0 and run["p99_ms"] >= run["p50_ms"]
        if turn["transport"] != "route":  # concurrent calls shared round trips
            assert turn["saturated"]["mean_batch"] > 1
    # Every transport was offered the same fixed rate.
    assert {turn["at_fixed_rate"]["mode"].split(",")[0] for turn in fleet["runs"]} == {
        "open loop at 300/s"}


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="transports must be among"):
        run_router_rpc_bench(blocks=1000, fleets=(1,), transports=("carrier-pigeon",))
