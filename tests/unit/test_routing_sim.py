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


def test_prefix_repetition_is_vllms_dataset_shape() -> None:
    from kvmesh.bench.routing.workloads import make_workload

    reqs = make_workload("prefix_repetition:5:64:16:8", 23, 10.0, seed=1)
    assert len(reqs) == 20  # n // prefixes per prefix, as vLLM samples
    heads = {r.prompt[:64] for r in reqs}
    assert len(heads) == 5 and all(len(r.prompt) == 80 and r.output_tokens == 8 for r in reqs)
    assert all(sum(r.prompt[:64] == h for r in reqs) == 4 for h in heads)
    assert len({r.prompt[64:] for r in reqs}) == 20  # every suffix its own
    order = [r.prompt[:64] for r in reqs]
    assert order != sorted(order, key=order.index)  # shuffled, not grouped
    assert reqs == make_workload("prefix_repetition:5:64:16:8", 23, 10.0, seed=1)
    default = make_workload("prefix_repetition", 64, 10.0, seed=0)
    assert len({r.prompt[:2048] for r in default}) == 32
    with pytest.raises(ValueError, match="four integers"):
        make_workload("prefix_repetition:5:64", 10, 1.0, seed=0)
    with pytest.raises(ValueError, match="cannot cover"):
        make_workload("prefix_repetition:50:8:8:8", 10, 1.0, seed=0)
