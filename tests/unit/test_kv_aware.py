import random

import pytest

from kvmesh.core.config import CostParams
from kvmesh.router.block_hash import namespace_seed, prompt_hashes
from kvmesh.router.cost_model import WorkerLoadInput, ttft_cost, within_bound
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.policy.kv_aware import KvAwarePolicy
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks
from kvmesh.router.registry import WorkerLoadView, WorkerState

pytestmark = pytest.mark.unit
BS = 16
PROMPT = list(range(1000, 1000 + 20 * BS))  # 20 blocks


def worker(wid: str, running: int = 0, waiting_uncached: int = 0) -> WorkerState:
    w = WorkerState(worker_id=wid, endpoint=wid, model="m", block_size=BS)
    w.load = WorkerLoadView(num_running=running, waiting_uncached_tokens=waiting_uncached)
    return w


def policy(index: PrefixIndex, seed: int = 0) -> KvAwarePolicy:
    return KvAwarePolicy(index, random.Random(seed), CostParams())


def cache(index: PrefixIndex, wid: str, tokens: list[int]) -> None:
    engine = [hash((wid, i)) & 0x7FFFFFFF for i in range(len(tokens) // BS)]
    index.stored(wid, StoredBlocks(engine, tokens, BS, None, model="m"))


def ctx(tokens: list[int], rid: str = "r") -> RouteContext:
    return RouteContext(request_id=rid, model="m", token_ids=tokens)


def test_prefers_the_worker_holding_the_prefix() -> None:
    index = PrefixIndex()
    cache(index, "b", PROMPT[: 12 * BS])
    choice = policy(index).choose(ctx(PROMPT + [1, 2, 3]), [worker("a"), worker("b")])
    assert choice.worker.worker_id == "b"
    assert choice.expected_cached_tokens == 12 * BS
    assert choice.reason == "kv_aware:prefix"


def test_queued_prefill_outweighs_a_small_hit() -> None:
    index = PrefixIndex()
    cache(index, "b", PROMPT[: 2 * BS])  # 32 cached tokens
    busy = worker("b", waiting_uncached=5000)  # 2 s of prefill queued
    choice = policy(index).choose(ctx(PROMPT), [worker("a"), busy])
    assert choice.worker.worker_id == "a" and choice.reason == "kv_aware:load"


def test_burst_of_a_new_prefix_lands_together_via_pending_blocks() -> None:
    index = PrefixIndex()
    p = policy(index, seed=1)
    workers = [worker("a"), worker("b"), worker("c")]
    first = p.choose(ctx(PROMPT, "r1"), workers)
    for i in range(2, 5):
        again = p.choose(ctx(PROMPT + [i], f"r{i}"), workers)
        assert again.worker.worker_id == first.worker.worker_id
        assert again.expected_cached_tokens == len(PROMPT)


def test_bounded_load_spreads_a_hot_prefix() -> None:
    index = PrefixIndex()
    cache(index, "a", PROMPT)
    hot = worker("a")
    hot.in_flight.update(f"x{i}" for i in range(10))  # > (1+2)·(10/6) + 1 = 6
    others = [worker(w) for w in "bcdef"]
    choice = policy(index).choose(ctx(PROMPT), [hot, *others])
    assert choice.worker.worker_id != "a"


def test_no_reuse_balances_by_load() -> None:
    index = PrefixIndex()
    rng = random.Random(5)
    p = policy(index, seed=2)
    workers = [worker("a", running=3), worker("b", running=0)]
    tokens = [rng.randrange(40000) for _ in range(BS * 3)]
    assert p.choose(ctx(tokens), workers).worker.worker_id == "b"


def test_cost_model_units_and_bound() -> None:
    params = CostParams(prefill_tokens_per_s=1000, decode_step_s_per_seq=0.01,
                        eviction_weight=2, balance_epsilon=0.5)
    load = WorkerLoadInput("w", active=2, running=2, queued_prefill_tokens=500, kv_usage=0.5)
    assert ttft_cost(params, load, prompt_tokens=1500, cached_tokens=1000) == pytest.approx(
        (500 + 500) / 1000 + 2 * 0.5 * 500 / 1000 + 2 * 0.01)
    loads = [WorkerLoadInput("a", 10, 10, 0), WorkerLoadInput("b", 0, 0, 0),
             WorkerLoadInput("c", 1, 1, 0)]
    assert [x.worker_id for x in within_bound(params, loads)] == ["b", "c"]


def test_cold_prefix_has_a_stable_home() -> None:
    """A prefix cached nowhere goes to the same worker every time (no copies)."""
    workers = [worker(w) for w in "abcdef"]
    homes = set()
    for seed in range(5):
        index = PrefixIndex()  # a fresh index: no speculative blocks between calls
        homes.add(policy(index, seed).choose(ctx(PROMPT), workers).worker.worker_id)
    assert len(homes) == 1
    other = [list(range(k * 1000, k * 1000 + 8 * BS)) for k in range(30)]
    spread = {policy(PrefixIndex()).choose(ctx(p), workers).worker.worker_id
              for p in other}
    assert len(spread) >= 4  # different prefixes partition across the fleet


def test_hashes_match_what_events_index() -> None:
    # The policy's prompt hashes and the index's event-derived hashes agree.
    index = PrefixIndex()
    cache(index, "a", PROMPT)
    hashes = prompt_hashes(PROMPT, BS, namespace_seed("m"))
    assert index.match(hashes, ["a"]) == {"a": 20}


def test_documents_after_a_shared_system_prompt_spread_over_its_holders() -> None:
    """Both workers hold a long shared system prompt; what each tenant adds (its
    document) gets a home of its own, so the documents partition across the two
    caches instead of piling onto one — and a tenant always returns to its home."""
    rng = random.Random(5)
    system = [rng.randrange(100, 40_000) for _ in range(24 * BS)]
    docs = [[rng.randrange(100, 40_000) for _ in range(8 * BS)] for _ in range(16)]
    homes: dict[int, set[str]] = {}
    for repeat in range(2):
        for k, doc in enumerate(docs):
            index = PrefixIndex()
            cache(index, "a", system)
            cache(index, "b", system)
            prompt = system + doc + [repeat + 1] * 8
            choice = policy(index, seed=repeat).choose(ctx(prompt), [worker("a"), worker("b")])
            homes.setdefault(k, set()).add(choice.worker.worker_id)
    assert all(len(h) == 1 for h in homes.values())  # deterministic per document
    placed = [h.pop() for h in homes.values()]
    assert 4 <= placed.count("a") <= 12  # spread, not all on one worker


def test_a_backlog_keeps_a_hit_where_an_idle_fleet_would_spill() -> None:
    """Both workers queued: a miss on the shorter queue delays everyone behind it, so
    the cached worker keeps the request (without the backlog price it spilled)."""
    index = PrefixIndex()
    cache(index, "b", PROMPT)
    a, b = worker("a", waiting_uncached=200), worker("b", waiting_uncached=800)
    a.load.num_waiting, b.load.num_waiting = 2, 4
    spill = KvAwarePolicy(index, random.Random(0), CostParams(backlog_weight=0))
    assert spill.choose(ctx(PROMPT + [7]), [a, b]).worker.worker_id == "a"
    index2 = PrefixIndex()
    cache(index2, "b", PROMPT)
    assert policy(index2).choose(ctx(PROMPT + [7]), [a, b]).worker.worker_id == "b"
    # An idle worker costs nothing extra to spill onto: no backlog, no price.
    assert policy(index2).choose(ctx(PROMPT + [8]), [worker("a"), b]).worker.worker_id == "a"


def test_pending_blocks_last_until_confirmed_or_finished() -> None:
    """However long the first request of a prefix queues, the next follows it; its
    marks end when it finishes (here: never confirmed, e.g. cancelled)."""
    now = [0.0]
    index = PrefixIndex(clock=lambda: now[0])
    queued = worker("q", waiting_uncached=25_000)
    p = KvAwarePolicy(index, random.Random(0), CostParams(pending_ttl_s=120))
    assert p.choose(ctx(PROMPT, "first"), [queued]).worker is queued
    now[0] = 60.0  # still queued, still pending
    assert p.cached_tokens(ctx(PROMPT), [queued])["q"] == len(PROMPT)
    p.finished("first")
    assert p.cached_tokens(ctx(PROMPT), [queued]).get("q", 0) == 0
    p.choose(ctx(PROMPT, "second"), [queued])
    now[0] = 200.0  # its finish never arrived: the TTL bounds the mark
    assert p.cached_tokens(ctx(PROMPT), [queued]).get("q", 0) == 0


def test_a_short_mark_does_not_cut_another_workers_long_one() -> None:
    now = [0.0]
    index = PrefixIndex(clock=lambda: now[0])
    hashes = prompt_hashes(PROMPT, BS, namespace_seed("m", ""))
    index.mark_pending("long", hashes, ttl_s=10.0)
    index.mark_pending("short", hashes, ttl_s=1.0)
    now[0] = 5.0
    assert index.match(hashes, ["long"])["long"] == len(hashes)


def test_a_cache_full_of_other_prefixes_is_priced_though_vllm_reports_it_idle() -> None:
    # vLLM's KV usage counts only blocks running requests hold: both workers report 0.
    # By its events, "a"'s cache is full of other prefixes, "b"'s is empty: storing a
    # new prefix on "a" evicts something, so every cold prompt goes to "b" whatever its
    # rendezvous home.
    index = PrefixIndex()
    cache(index, "a", list(range(50_000, 50_000 + 64 * BS)))  # 64 blocks
    a, b = worker("a"), worker("b")
    a.kv_capacity_tokens = b.kv_capacity_tokens = 64 * BS
    chosen = {policy(index).choose(ctx([7_000 + 997 * i + t for t in range(20 * BS)],
                                       f"r{i}"), [a, b]).worker.worker_id
              for i in range(12)}
    assert chosen == {"b"}
