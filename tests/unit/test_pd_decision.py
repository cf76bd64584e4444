"""Aggregated vs disaggregated per request, from the one cost model."""

import random

import pytest

from kvmesh.core.config import CostParams
from kvmesh.core.errors import NoWorkerAvailableError
from kvmesh.router.cost_model import WorkerLoadInput, aggregated_cost, disaggregated_cost
from kvmesh.router.pd import compatible, decide, least_loaded
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.policy.kv_aware import KvAwarePolicy
from kvmesh.router.policy.round_robin import RoundRobinPolicy
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks
from kvmesh.router.registry import WorkerLoadView, WorkerState

pytestmark = pytest.mark.unit
BS = 32


def worker(wid: str, role: str, running: int = 0, connector: str = "nixl") -> WorkerState:
    w = WorkerState(worker_id=wid, endpoint=wid, model="m", role=role, block_size=BS,
                    kv_connector="" if role == "both" else connector)
    w.load = WorkerLoadView(num_running=running)
    return w


def ctx(n: int, rid: str = "r") -> RouteContext:
    return RouteContext(request_id=rid, model="m", token_ids=list(range(5000, 5000 + n)))


def run(whole, prefill, decode, n=2000, mode="auto", policy=None, params=None):  # type: ignore[no-untyped-def]
    policy = policy or KvAwarePolicy(PrefixIndex(), random.Random(0))
    return decide(policy, ctx(n), whole, prefill, decode, mode, params or CostParams(),
                  random.Random(0))


def test_long_uncached_prompt_on_busy_decoders_disaggregates() -> None:
    both = worker("b", "both", running=12)
    p, d = worker("p", "prefill"), worker("d", "decode", running=12)
    choice = run([both, d], [p], [d], n=3000)
    assert choice.disaggregated
    assert choice.prefill_worker is p and choice.worker is d
    assert choice.reason.startswith("pd:disaggregated")


def test_short_prompt_stays_aggregated() -> None:
    both = worker("b", "both", running=2)
    p, d = worker("p", "prefill"), worker("d", "decode", running=2)
    choice = run([both, d], [p], [d], n=40)
    assert not choice.disaggregated
    assert choice.reason.startswith("pd:aggregated")


def test_prompt_cached_on_an_aggregated_worker_stays_there() -> None:
    index = PrefixIndex()
    request = ctx(3000)
    tokens = list(request.token_ids)[: 90 * BS]
    engine = [hash(("b", i)) & 0x7FFFFFFF for i in range(90)]
    index.stored("b", StoredBlocks(engine, tokens, BS, None, model="m"))
    both = worker("b", "both", running=12)
    p, d = worker("p", "prefill"), worker("d", "decode", running=12)
    choice = run([both, d], [p], [d], n=3000, policy=KvAwarePolicy(index, random.Random(0)))
    assert not choice.disaggregated and choice.worker is both
    assert choice.expected_cached_tokens == 90 * BS


def test_prefill_choice_is_prefix_affine_decode_choice_load_based() -> None:
    index = PrefixIndex()
    request = ctx(3000)
    tokens = list(request.token_ids)[: 60 * BS]
    index.stored("p2", StoredBlocks([hash(("p2", i)) & 0x7FFFFFFF for i in range(60)],
                                    tokens, BS, None, model="m"))
    p1, p2 = worker("p1", "prefill"), worker("p2", "prefill")
    d1, d2 = worker("d1", "decode", running=5), worker("d2", "decode", running=1)
    choice = run([d1, d2], [p1, p2], [d1, d2], n=3000, mode="always",
                 policy=KvAwarePolicy(index, random.Random(0)))
    assert choice.prefill_worker is p2 and choice.worker is d2
    assert choice.expected_cached_tokens == 60 * BS


def test_modes_force_or_forbid_the_split() -> None:
    p, d = worker("p", "prefill"), worker("d", "decode")
    assert run([d], [p], [d], n=10, mode="always").disaggregated
    assert not run([d], [p], [d], n=5000, mode="never").disaggregated


def test_pure_pd_pool_splits_when_the_decoder_is_busy() -> None:
    p, d = worker("p", "prefill"), worker("d", "decode")
    # An idle decode worker prefills a long prompt itself sooner than P + transfer...
    assert not run([d], [p], [d], n=3000).disaggregated
    # ...but not while it decodes for others: their tokens would stall.
    d.load = WorkerLoadView(num_running=8)
    assert run([d], [p], [d], n=3000).disaggregated
    assert not run([d], [p], [d], n=20).disaggregated
    # Nothing can run a whole request: split even a short one.
    assert run([], [p], [d], n=10).disaggregated


def test_no_decode_partner_means_aggregated() -> None:
    both, p = worker("b", "both"), worker("p", "prefill")
    choice = run([both], [p], [], mode="always")
    assert not choice.disaggregated and choice.worker is both
    lm = worker("d", "decode", connector="lmcache")
    assert not compatible(p, lm)
    assert run([both, lm], [p], [lm], mode="always").worker is not p


def test_only_prefill_workers_still_serve_whole_requests() -> None:
    p = worker("p", "prefill")
    choice = run([], [p], [], n=100, policy=RoundRobinPolicy())
    assert choice.worker is p and not choice.disaggregated


def test_no_worker_is_the_one_error() -> None:
    with pytest.raises(NoWorkerAvailableError):
        run([], [], [])


def test_least_loaded_prefers_fewer_active_then_emptier_cache() -> None:
    a, b, c = worker("a", "decode", 3), worker("b", "decode", 1), worker("c", "decode", 1)
    c.load.kv_usage = 0.5
    assert least_loaded([a, b, c], random.Random(0)) is b


def test_costs_grow_with_what_each_side_pays() -> None:
    params = CostParams()
    idle = WorkerLoadInput("w", active=0, running=0, queued_prefill_tokens=0)
    busy = WorkerLoadInput("w", active=10, running=10, queued_prefill_tokens=0)
    # Stalling running decodes is what makes aggregated expensive on a busy worker.
    assert aggregated_cost(params, busy, 2000, 0) > aggregated_cost(params, idle, 2000, 0) \
        + 10 * params.decode_step_s_per_seq
    # Disaggregating pays the overhead and the transfer on top of the prefill itself.
    assert disaggregated_cost(params, idle, idle, 2000, 0) == pytest.approx(
        2000 / params.prefill_tokens_per_s + params.pd_overhead_s
        + 2000 / params.kv_transfer_tokens_per_s)
