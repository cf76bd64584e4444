"""Routing policies behind one interface.

A policy sees the candidate workers for a request (already filtered by model,
adapter and role) and picks one. The KV-aware policy plugs in here too: it gets the
prompt's token ids through :class:`RouteContext`.
"""

from __future__ import annotations

import functools
import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvmesh.core.errors import NoWorkerAvailableError
from kvmesh.router.block_hash import U64Array, namespace_seed, prompt_hash_array
from kvmesh.router.cost_model import CostParams, WorkerLoadInput, ttft_cost, within_bound
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.registry import WorkerState


@dataclass(frozen=True)
class RouteContext:
    """What a policy may look at besides the workers."""

    request_id: str
    model: str
    adapter: str = ""
    token_ids: Sequence[int] = field(default_factory=tuple)
    max_tokens: int = 0


@dataclass(frozen=True)
class Choice:
    worker: WorkerState
    reason: str
    expected_cached_tokens: int = 0


class Policy(Protocol):
    name: str

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        """Pick one of ``workers`` (never empty) for the request."""
        ...


class RandomPolicy:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        return Choice(self._rng.choice(list(workers)), "random")


class RoundRobinPolicy:
    """Cycles through the candidates of each model in worker-id order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        key = f"{ctx.model}\x00{ctx.adapter}"
        index = self._next.get(key, 0)
        self._next[key] = index + 1
        return Choice(workers[index % len(workers)], "round_robin")


class PowerOfTwoPolicy:
    """Samples two candidates and takes the less loaded (ties: the first sampled)."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        if len(workers) == 1:
            return Choice(workers[0], "power_of_two:only_candidate")
        a, b = self._rng.sample(list(workers), 2)
        if b.active < a.active or (b.active == a.active and b.load.kv_usage < a.load.kv_usage):
            return Choice(b, "power_of_two:less_loaded")
        return Choice(a, "power_of_two:less_loaded")


class KvAwarePolicy:
    """Precise prefix affinity from the KV index, priced by the one cost model.

    Each candidate's cached prefix comes from the prefix index (events + pending
    blocks); its cost is the estimated time to first token there; bounded load keeps
    the choice from piling onto one cache; ties break randomly. The chosen worker's
    blocks are marked pending so the next request with the same prefix follows.
    """

    name = "kv_aware"

    def __init__(self, index: PrefixIndex, rng: random.Random,
                 params: CostParams | None = None) -> None:
        self._index = index
        self._rng = rng
        self.params = params or CostParams()
        # request id -> (worker, marked hashes, expiry): cleared when it finishes.
        self._marks: dict[str, tuple[str, U64Array, float]] = {}

    def finished(self, request_id: str) -> None:
        """The request is done: blocks it marked pending and its events never
        confirmed (cancelled, failed) stop counting as cached."""
        marked = self._marks.pop(request_id, None)
        if marked is not None:
            self._index.clear_pending(marked[0], marked[1])

    def _remember(self, request_id: str, worker_id: str, hashes: U64Array) -> None:
        now = time.monotonic()
        if len(self._marks) >= MAX_REMEMBERED_MARKS:  # finishes lost (a gateway died)
            self._marks = {r: m for r, m in self._marks.items() if m[2] > now}
        self._marks[request_id] = (worker_id, hashes, now + self.params.pending_ttl_s)

    def cached_tokens(
        self, ctx: RouteContext, workers: Sequence[WorkerState]
    ) -> tuple[dict[str, int], dict[int, U64Array]]:
        """Prompt tokens each worker holds (confirmed or pending), without side
        effects; also the prompt's block hashes per block size."""
        seed = namespace_seed(ctx.model, ctx.adapter)
        cached: dict[str, int] = {}
        hashes_by_size: dict[int, U64Array] = {}
        for block_size in {w.block_size for w in workers if w.block_size > 0}:
            hashes = prompt_hash_array(ctx.token_ids, block_size, seed)
            hashes_by_size[block_size] = hashes
            ids = [w.worker_id for w in workers if w.block_size == block_size]
            for worker_id, blocks in self._index.match(hashes, ids).items():
                cached[worker_id] = blocks * block_size
        return cached, hashes_by_size

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        cached, hashes_by_size = self.cached_tokens(ctx, workers)
        by_id = {w.worker_id: w for w in workers}
        loads = within_bound(self.params, [load_input(w) for w in workers])
        prompt_tokens = len(ctx.token_ids)
        costs = {
            x.worker_id: ttft_cost(self.params, x, prompt_tokens, cached.get(x.worker_id, 0))
            for x in loads
        }
        best = min(costs.values())
        # Capacity-aware placement: among the workers within a small slack of the best
        # cost, prefer the prompt's rendezvous "home". A prefix that is cold everywhere
        # then always lands on the same worker, so the fleet's caches partition the hot
        # set instead of each caching a copy of it (and thrashing when it outgrows one).
        slack = self.params.placement_slack * prompt_tokens / self.params.prefill_tokens_per_s
        near = [wid for wid, c in costs.items() if c <= best + slack + 1e-9]
        key = placement_key(hashes_by_size, by_id, near, cached)
        if key is None:
            chosen = by_id[self._rng.choice(near)]
        else:
            chosen = by_id[max(near, key=lambda wid: rendezvous_score(key, wid))]
        hits = cached.get(chosen.worker_id, 0)
        hashes = hashes_by_size.get(chosen.block_size)
        if hashes is not None and len(hashes):
            # Pending until its events confirm the blocks or the request finishes:
            # however long it queues, the next request with this prefix follows it.
            self._index.mark_pending(chosen.worker_id, hashes, self.params.pending_ttl_s)
            self._remember(ctx.request_id, chosen.worker_id, hashes)
        return Choice(chosen, "kv_aware:prefix" if hits else "kv_aware:load", hits)


def load_input(w: WorkerState) -> WorkerLoadInput:
    """What the cost model needs of a worker's load (called per candidate per decision:
    plain comparisons, positional fields)."""
    load = w.load
    routed, running, active = len(w.in_flight), load.num_running, w.active
    # Routed since the last report and not yet running count as waiting.
    unstarted = active - running
    waiting = unstarted if unstarted > load.num_waiting else load.num_waiting
    return WorkerLoadInput(
        w.worker_id, active, routed if routed > running else running,
        load.waiting_uncached_tokens + w.unreported_prefill_tokens, load.kv_usage, waiting)


def placement_key(
    hashes_by_size: dict[int, U64Array], by_id: dict[str, WorkerState], near: list[str],
    cached: dict[str, int] | None = None,
) -> int | None:
    """The prompt's placement key: its chained hash a few blocks past the longest
    prefix cached anywhere — the part that identifies what this prompt adds (a system
    prompt when nothing is cached; the tenant's document after a shared system prompt)
    — or None for sub-block prompts. Prompts that add the same content share a home;
    prompts that add different content spread over the near-equal workers."""
    sizes = {by_id[w].block_size for w in near}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    hashes = hashes_by_size.get(size)
    if hashes is None or not len(hashes):
        return None
    start = max((tokens for w, tokens in (cached or {}).items()
                 if w in by_id and by_id[w].block_size == size), default=0) // size
    return int(hashes[min(len(hashes), start + PLACEMENT_BLOCKS) - 1])


PLACEMENT_BLOCKS = 4
MAX_REMEMBERED_MARKS = 65536


_MASK64 = (1 << 64) - 1


def rendezvous_score(key: int, worker_id: str) -> int:
    """Highest-random-weight score of ``worker_id`` for ``key``: splitmix64's finaliser
    over the key and the worker's salt (a few integer operations per candidate)."""
    x = key ^ _worker_salt(worker_id)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)
def _worker_salt(worker_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(worker_id.encode(), digest_size=8).digest(), "little")


POLICY_NAMES = ("random", "round_robin", "power_of_two", "approx_prefix", "kv_aware")


def make_policy(
    name: str, seed: int | None = None, index: PrefixIndex | None = None,
    params: CostParams | None = None,
) -> Policy:
    rng = random.Random(seed)
    if name == "random":
        return RandomPolicy(rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    if name == "approx_prefix":
        from kvmesh.router.approx_prefix import ApproxPrefixPolicy

        return ApproxPrefixPolicy(rng)
    if name == "kv_aware":
        return KvAwarePolicy(index if index is not None else PrefixIndex(), rng, params)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def pick(policy: Policy, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
    """Apply ``policy``, with the one error every caller needs for an empty pool."""
    if not workers:
        raise NoWorkerAvailableError(
            f"no live worker serves model {ctx.model!r}"
            + (f" with adapter {ctx.adapter!r}" if ctx.adapter else "")
        )
    return policy.choose(ctx, workers)
