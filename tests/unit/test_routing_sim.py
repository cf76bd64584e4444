"""Policy behaviour in the deterministic simulator (virtual time, real index/events)."""

import pytest

from kvmesh.bench.routing.sim import SimParams, SimWorker, simulate
from kvmesh.bench.routing.workloads import make_workload

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shared() -> list:
    return make_workload("shared_prefix", 600, 3.5 * 8, seed=4)


def test_kv_aware_reaches_the_oracle_and_beats_power_of_two(shared: list) -> None:
    kv = simulate("kv_aware", shared, 8, seed=1)
    p2 = simulate("power_of_two", shared, 8, seed=1)
    assert kv["hit_rate"] >= 0.95 * kv["oracle_hit_rate"]
    assert kv["hit_rate"] > p2["hit_rate"] + 0.15
    assert kv["ttft_p90_s"] <= 0.5 * p2["ttft_p90_s"]


def test_no_regression_without_reuse() -> None:
    workload = make_workload("low_reuse", 400, 3.5 * 8, seed=2)
    kv = simulate("kv_aware", workload, 8, seed=1)
    p2 = simulate("power_of_two", workload, 8, seed=1)
    assert kv["hit_rate"] == 0.0
    assert kv["throughput_tok_s"] >= 0.97 * p2["throughput_tok_s"]


def test_simulated_worker_cache_and_events() -> None:
    w = SimWorker("w", SimParams(block_size=4, capacity_blocks=3))
    prompt = tuple(range(12))
    cached, batch = w.prefill(prompt)
    assert cached == 0 and len(batch.events[0].stored.blocks) == 3
    cached, batch = w.prefill(prompt)
    assert cached == 12 and list(batch.events) == []
    cached, batch = w.prefill(tuple(range(100, 108)))  # 2 new blocks evict 2 old ones
    kinds = [e.WhichOneof("data") for e in batch.events]
    assert kinds == ["stored", "removed"] and len(batch.events[1].removed.block_hashes) == 2
    assert batch.sequence_number == 3
