"""The vectorised cost model agrees with the per-candidate one it replaces on the
decision path (same formulas, numpy instead of a Python loop per worker)."""

import random

import numpy as np
import pytest

from kvmesh.core.config import CostParams
from kvmesh.router.cost_model import load_input, ttft_cost, within_bound
from kvmesh.router.cost_vector import (
    load_arrays,
    load_terms,
    near_equals,
    near_salts,
    rendezvous_pick,
    rendezvous_scores,
    salts,
)
from kvmesh.router.kernels import costs as kernel_costs
from kvmesh.router.policy.kv_aware import placement_key, rendezvous_score
from kvmesh.router.registry import Candidates, WorkerLoadView, WorkerRegistry, WorkerState

pytestmark = pytest.mark.unit


def _fleet(rng: random.Random, n: int) -> list[WorkerState]:
    workers = []
    for i in range(n):
        w = WorkerState(worker_id=f"w{i:03d}", endpoint="e", model="m", block_size=32)
        w.load = WorkerLoadView(rng.randrange(20), rng.randrange(10), rng.uniform(-0.1, 1.2),
                                1.0, rng.randrange(5000))
        w.in_flight = {f"r{i}-{j}" for j in range(rng.randrange(30))}
        w.unreported_prefill_tokens = rng.randrange(3000)
        workers.append(w)
    return workers


@pytest.mark.parametrize("seed", range(5))
def test_vector_costs_equal_the_per_candidate_costs(seed: int) -> None:
    rng = random.Random(seed)
    params = CostParams(balance_epsilon=rng.choice([0.1, 0.5, 2.0]))
    workers = _fleet(rng, 64)
    cached = [rng.choice([0, 32 * rng.randrange(100)]) for _ in workers]
    inputs = [load_input(w) for w in workers]
    arrays = load_arrays(workers)
    for field, column in zip(("active", "running", "queued_prefill_tokens", "kv_usage",
                              "waiting"), arrays, strict=True):
        assert column.tolist() == [float(getattr(x, field)) for x in inputs], field
    kept = {x.worker_id for x in within_bound(params, inputs)}
    bound, _, _ = near_equals(params, arrays, 4096, np.array(cached, dtype=float))
    assert {workers[i].worker_id for i in bound.tolist()} == kept
    # Every candidate's cost, kept or not: its uncached prefill and load terms, from the
    # formula the compiled decision sums.
    costs = kernel_costs.load_terms(
        4096.0, np.array(cached, dtype=float), arrays.queued_prefill_tokens, arrays.waiting,
        arrays.kv_usage, arrays.running, params.prefill_tokens_per_s, params.backlog_weight,
        params.eviction_weight, params.decode_step_s_per_seq).sum(axis=0)
    assert costs.tolist() == pytest.approx(
        [ttft_cost(params, x, 4096, c) for x, c in zip(inputs, cached, strict=True)],
        rel=1e-12)


def test_vector_rendezvous_scores_equal_the_scalar_ones() -> None:
    workers = _fleet(random.Random(9), 40)
    for key in (0, 1, 2**63 + 12345, 2**64 - 1):
        scores = rendezvous_scores(key, salts(workers)).tolist()
        assert scores == [rendezvous_score(key, w.worker_id) for w in workers]


def test_a_selection_keeps_the_salts_of_its_workers() -> None:
    """A registry selection carries its salts (worked out once, kept while the worker
    set stands, and by a copy of it): the near-equals' salts gathered from it equal
    those looked up per id."""
    registry = WorkerRegistry(lease_ttl_s=10)
    for w in _fleet(random.Random(3), 64):
        registry.upsert(w)
    selection = registry.candidates(model="m")
    again = registry.candidates(model="m")
    assert again is selection
    copy = Candidates(selection, like=selection)
    assert copy is not selection and copy.salts is selection.salts
    near = np.array([0, 5, 17, len(selection) - 1])
    assert near_salts(selection, near).tolist() == \
        salts([selection[i] for i in near.tolist()]).tolist()
    assert near_salts(list(selection), near).tolist() == near_salts(selection, near).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_the_compiled_rendezvous_pick_is_the_highest_score(seed: int) -> None:
    """A decision over a registry selection picks among the near-equals in one
    compiled pass over its kept salts: the same worker as the scores' argmax, which a
    plain list of workers still takes."""
    rng = random.Random(seed)
    registry = WorkerRegistry(lease_ttl_s=10)
    for w in _fleet(rng, rng.choice([2, 16, 256])):
        registry.upsert(w)
    selection = registry.candidates(model="m")
    for _ in range(50):
        near = np.array(sorted(rng.sample(range(len(selection)),
                                          rng.randrange(1, len(selection) + 1))))
        key = rng.getrandbits(64)
        best = max(near.tolist(), key=lambda i: (rendezvous_score(key, selection[i].worker_id),
                                                 -i))
        assert rendezvous_pick(key, selection, near) == best
        assert rendezvous_pick(key, list(selection), near) == best


def test_the_one_size_placement_key_equals_the_general_one() -> None:
    """With one block size across the candidates the key skips the per-size masks; it
    is the key the general path finds."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        n, blocks = int(rng.integers(1, 40)), int(rng.integers(0, 12))
        hashes = {32: rng.integers(0, 2**63, blocks, dtype=np.uint64)}
        sizes = np.full(n, 32, dtype=np.int64)
        cached = rng.integers(0, blocks + 1, n) * 32.0
        near = np.flatnonzero(rng.random(n) < 0.5) if n > 1 else np.arange(1)
        if not len(near):
            near = np.arange(1)
        assert placement_key(hashes, sizes, near, cached, 32) == \
            placement_key(hashes, sizes, near, cached)


@pytest.mark.parametrize("seed", range(6))
def test_one_pass_near_equals_equal_the_per_candidate_steps(seed: int) -> None:
    """The compiled pass a decision takes (bound, costs, near-equals in one call) picks
    what the per-candidate model picks, with the same costs, and its load terms add up
    to those costs."""
    rng = random.Random(100 + seed)
    params = CostParams(balance_epsilon=rng.choice([0.1, 0.5, 2.0]),
                        placement_slack=rng.choice([0.0, 0.1, 0.5]))
    workers = _fleet(rng, rng.choice([1, 3, 16, 256]))
    cached = [rng.choice([0, 32 * rng.randrange(200)]) for _ in workers]
    inputs = [load_input(w) for w in workers]
    prompt = rng.choice([100, 4096, 8192])
    kept, costs, near = near_equals(params, load_arrays(workers), prompt,
                                    np.array(cached, dtype=float))
    by_bound = {x.worker_id for x in within_bound(params, inputs)}
    assert {workers[i].worker_id for i in kept.tolist()} == by_bound
    scalar = [ttft_cost(params, inputs[i], prompt, cached[i]) for i in kept.tolist()]
    assert costs.tolist() == pytest.approx(scalar, rel=1e-12)
    slack = params.placement_slack * prompt / params.prefill_tokens_per_s
    assert near.tolist() == [i for i, c in zip(kept.tolist(), scalar, strict=True)
                             if c <= min(scalar) + slack + 1e-9]
    arrays = load_arrays(workers)
    terms = load_terms(params, type(arrays)(*(a[kept] for a in arrays)), prompt,
                       np.array(cached, dtype=float)[kept])
    uncached = np.maximum(prompt - np.array(cached, dtype=float)[kept], 0) / \
        params.prefill_tokens_per_s
    assert (uncached + sum(terms)).tolist() == pytest.approx(costs.tolist(), rel=1e-12)


def test_a_kv_floor_raises_each_candidates_kv_usage_to_it() -> None:
    """What the index says a cache holds is a floor under the KV usage a worker
    reports (kv_aware's ``_held``), applied in the gathering pass."""
    workers = _fleet(random.Random(3), 16)
    plain = load_arrays(workers)
    floor = np.linspace(0.0, 1.0, len(workers))
    floored = load_arrays(workers, kv_floor=floor)
    assert floored.kv_usage.tolist() == np.maximum(plain.kv_usage, floor).tolist()
    assert floored.kv_usage.tolist() != plain.kv_usage.tolist()
    for name in ("active", "running", "queued_prefill_tokens", "waiting"):
        assert getattr(floored, name).tolist() == getattr(plain, name).tolist(), name
