"""The router and LoRA adapters: which workers may serve an adapter, what the worker
reports, and how the cost model prices an adapter a worker has not loaded — in prefill
tokens, like a cache miss — so adapter traffic sticks to holders and spreads when they
are busy."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvmesh.core.config import CostParams, RouterConfig
from kvmesh.router.core import RouteQuery, RouterCore
from kvmesh.router.cost_model import load_input, ttft_cost
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.policy.kv_aware import KvAwarePolicy
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks
from kvmesh.router.registry import WorkerLoadView, WorkerRegistry, WorkerState

pytestmark = pytest.mark.unit
BS = 16


def worker(wid: str, loaded: tuple[str, ...] = (), servable: tuple[str, ...] = ("poet", "sql"),
           waiting_uncached: int = 0, slots: int = 1) -> WorkerState:
    w = WorkerState(worker_id=wid, endpoint=wid, model="m", block_size=BS, adapters=loaded,
                    servable_adapters=servable, lora_slots=slots)
    w.load = WorkerLoadView(waiting_uncached_tokens=waiting_uncached)
    return w


def ctx(tokens: list[int], adapter: str = "sql", rid: str = "r") -> RouteContext:
    return RouteContext(request_id=rid, model="m", adapter=adapter, token_ids=tokens)


def test_an_adapter_not_loaded_costs_its_load_as_prefill_tokens() -> None:
    params = CostParams(adapter_load_tokens=300)
    cold = load_input(worker("a"), "sql", params.adapter_load_tokens)
    holder = load_input(worker("b", loaded=("sql",)), "sql", params.adapter_load_tokens)
    assert cold.queued_prefill_tokens == 300 and holder.queued_prefill_tokens == 0
    # The same unit as a miss: a cold worker costs what 300 more uncached tokens cost.
    assert ttft_cost(params, cold, 100, 0) == pytest.approx(
        ttft_cost(params, holder, 400, 0))
    assert ttft_cost(params, cold, 100, 0) - ttft_cost(params, holder, 100, 0) == \
        pytest.approx(300 / params.prefill_tokens_per_s)
    # The base model needs no adapter anywhere.
    assert load_input(worker("a"), "", 300).queued_prefill_tokens == 0


@pytest.mark.parametrize("seed", range(8))
def test_adapter_requests_stick_to_the_worker_holding_the_adapter(seed: int) -> None:
    policy = KvAwarePolicy(PrefixIndex(), random.Random(seed), CostParams())
    workers = [worker("a"), worker("b", loaded=("sql",)), worker("c")]
    for i in range(5):  # short prompts: no prefix affinity to help
        choice = policy.choose(ctx([i, i + 1], rid=f"r{i}"), workers)
        assert choice.worker.worker_id == "b"


def test_without_the_adapter_term_the_choice_ignores_who_holds_it() -> None:
    chosen = set()
    for seed in range(16):
        policy = KvAwarePolicy(PrefixIndex(), random.Random(seed),
                               CostParams(adapter_load_tokens=0))
        workers = [worker("a"), worker("b", loaded=("sql",)), worker("c")]
        chosen.add(policy.choose(ctx([1, 2]), workers).worker.worker_id)
    assert chosen == {"a", "b", "c"}


def test_adapter_traffic_spreads_when_the_holder_is_loaded() -> None:
    params = CostParams(adapter_load_tokens=256)
    policy = KvAwarePolicy(PrefixIndex(), random.Random(0), params)
    busy_holder = worker("b", loaded=("sql",), waiting_uncached=1000)  # 1000 tokens queued
    choice = policy.choose(ctx([1, 2]), [worker("a"), busy_holder])
    assert choice.worker.worker_id == "a"
    # A short queue is cheaper than a load: the holder keeps it.
    light_holder = worker("b", loaded=("sql",), waiting_uncached=100)
    assert policy.choose(ctx([1, 2]), [worker("a"), light_holder]).worker.worker_id == "b"


def test_kv_blocks_are_namespaced_per_adapter() -> None:
    """Blocks an engine stored under an adapter (its KV events name it) match requests
    for that adapter only, not the base model's or another adapter's."""
    index = PrefixIndex()
    tokens = list(range(100, 100 + 4 * BS))
    index.stored("a", StoredBlocks([11, 12, 13, 14], tokens, BS, None, model="m",
                                   adapter="sql"))
    policy = KvAwarePolicy(index, random.Random(0), CostParams())
    workers = [worker("a"), worker("b")]
    def hits(adapter: str) -> dict[str, int]:
        cached = policy.cached_tokens(ctx(tokens, adapter), workers)
        return {w: n for w, n in cached.items() if n}

    assert hits("sql") == {"a": 4 * BS}
    assert hits("") == {} and hits("poet") == {}


def test_candidates_are_workers_that_can_serve_the_adapter() -> None:
    reg = WorkerRegistry(lease_ttl_s=10)
    reg.upsert(worker("lora", servable=("sql",)))
    reg.upsert(worker("loaded-only", loaded=("sql",), servable=()))
    reg.upsert(WorkerState(worker_id="plain", endpoint="plain", model="m"))
    assert [w.worker_id for w in reg.candidates("m", "sql")] == ["loaded-only", "lora"]
    assert reg.candidates("m", "poet") == []
    assert len(reg.candidates("m")) == 3


def test_reports_replace_the_adapters_and_move_the_version_when_servable_changes() -> None:
    reg = WorkerRegistry(lease_ttl_s=10)
    reg.upsert(worker("a", servable=("sql",)))
    version = reg.version
    assert not reg.report_adapters("a", ["sql"], ["sql"])  # only the loaded set changed
    assert reg.get("a").adapters == ("sql",) and reg.version == version
    assert reg.report_adapters("a", [], ["sql", "chef"])
    assert reg.get("a").servable_adapters == ("chef", "sql") and reg.version == version + 1
    assert not reg.report_adapters("gone", [], ["x"])


def test_a_routed_adapter_counts_as_loaded_at_once_within_the_slots() -> None:
    reg = WorkerRegistry(lease_ttl_s=10)
    reg.upsert(worker("a", loaded=("sql",), slots=2))
    reg.adapter_routed("a", "poet")
    assert reg.get("a").adapters == ("sql", "poet")
    reg.adapter_routed("a", "chef")  # two slots: the least recently used goes
    assert reg.get("a").adapters == ("poet", "chef")
    reg.adapter_routed("a", "poet")
    assert reg.get("a").adapters == ("chef", "poet")


def test_the_router_core_keeps_a_new_adapter_on_the_worker_it_sent_it_to() -> None:
    """No report in between: the first request's worker is known to be loading the
    adapter, so the next ones follow it; heartbeats then carry the worker's own view."""

    async def run() -> None:
        core = RouterCore(RouterConfig(seed=3, metrics_port=None))
        for wid in ("w0", "w1", "w2"):
            core.add_worker(worker(wid))
        chosen = []
        for i in range(6):
            decision = await core.route(RouteQuery(ctx([i, i + 7], rid=f"r{i}")))
            chosen.append(decision.worker.worker_id)
            core.finish(decision.worker.worker_id, f"r{i}")
        assert len(set(chosen)) == 1, chosen
        assert core.metrics.adapter_routes.labels("loaded")._value.get() == 5
        holder = chosen[0]
        # The worker evicted it meanwhile (its report says so): a fresh choice.
        assert core.heartbeat(holder, [], ["sql", "poet"]) == (True, False)
        assert core.registry.get(holder).adapters == ()
        assert core.heartbeat(holder, [], ["sql"]) == (True, True)

    asyncio.run(run())
