"""`kv_aware` (the default): precise prefix affinity from the KV index, priced by the
one cost model (``cost_model.py``), placed by rendezvous hashing among near-equals."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from kvmesh.core.config import CostParams
from kvmesh.router.block_hash import U64Array, namespace_seed, prompt_hash_array
from kvmesh.router.cost_vector import (
    F64,
    I64,
    LoadArrays,
    load_arrays,
    near_equals,
    rendezvous_pick,
)
from kvmesh.router.policy.base import Choice, RouteContext
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.registry import Candidates, WorkerState
from kvmesh.router.salts import worker_salt

PLACEMENT_BLOCKS = 4
_BLOCK_SIZE = attrgetter("block_size")
_WORKER_ID = attrgetter("worker_id")
_CAPACITY = attrgetter("kv_capacity_tokens")
MAX_REMEMBERED_MARKS = 65536
HELD_REFRESH_S = 0.05
_MASK64 = (1 << 64) - 1


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
        #: The last decision's workings (``evaluate``), for explaining it.
        self.last: Evaluation | None = None
        self._held_kept: tuple[float, list[str], F64] | None = None  # (when, ids, held)

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

    def cached_tokens(self, ctx: RouteContext, workers: Sequence[WorkerState]
                      ) -> dict[str, int]:
        """Prompt tokens each worker holds (confirmed or pending), without side
        effects."""
        cached, _, _ = self._match(ctx, workers)
        return {w.worker_id: int(c) for w, c in zip(workers, cached.tolist(), strict=True)}

    def _match(
        self, ctx: RouteContext, workers: Sequence[WorkerState]
    ) -> tuple[F64, dict[int, U64Array], I64]:
        """Prompt tokens each worker holds and each one's block size (in the workers'
        order), and the prompt's block hashes per block size (what ``choose`` marks
        pending on the chosen worker)."""
        seed = namespace_seed(ctx.model, ctx.adapter)
        cached = np.zeros(len(workers))
        selection = workers if isinstance(workers, Candidates) else None
        present: frozenset[int] | set[int]
        if selection is not None:  # the registry's selection: worked out once
            sizes, present = selection.block_sizes, selection.size_set
        else:
            sizes = np.fromiter(map(_BLOCK_SIZE, workers), np.int64, len(workers))
            present = set(np.unique(sizes).tolist())
        hashes_by_size: dict[int, U64Array] = {}
        for block_size in present - {0}:
            hashes = prompt_hash_array(ctx.token_ids, block_size, seed)
            hashes_by_size[block_size] = hashes
            if len(present) == 1:  # one block size: every worker, no gather
                at: Any = slice(None)
                ids = selection.ids if selection is not None else list(
                    map(_WORKER_ID, workers))
            else:
                at = np.flatnonzero(sizes == block_size)
                ids = [workers[i].worker_id for i in at.tolist()]
            cached[at] = self._index.match_array(hashes, ids) * block_size
        return cached, hashes_by_size, sizes

    def _held(self, workers: Sequence[WorkerState]) -> F64:
        """Each worker's cache as full as its events say: indexed blocks over capacity.
        vLLM's own KV usage counts only blocks running requests hold (cached blocks
        nobody uses are free to it), so an idle worker whose cache is full of other
        prefixes reports ~0 — yet every block it stores evicts one of them. A cache
        fills over seconds: for a registry selection the figures are kept for
        ``HELD_REFRESH_S`` (of the index's clock) rather than read per decision."""
        if not isinstance(workers, Candidates):
            return self._read_held(workers)
        now = self._index.clock()
        kept = self._held_kept
        if kept is None or kept[1] is not workers.ids or now - kept[0] >= HELD_REFRESH_S:
            kept = self._held_kept = (now, workers.ids, self._read_held(workers))
        return kept[2]

    def _read_held(self, workers: Sequence[WorkerState]) -> F64:
        n = len(workers)
        held = np.fromiter(map(self._index.blocks, map(_WORKER_ID, workers)), np.float64, n)
        capacity = np.fromiter(map(_CAPACITY, workers), np.float64, n)
        blocks = np.fromiter(map(_BLOCK_SIZE, workers), np.float64, n)
        return np.divide(held * blocks, capacity, out=np.zeros(n), where=capacity > 0)

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        choice, hashes = self.decide(ctx, workers)
        self._book(ctx, choice.worker, hashes)
        return choice

    def book(self, ctx: RouteContext, worker: WorkerState) -> None:
        """Record that ``worker`` got the request (as ``choose`` does for its own
        choice): a replica told of another replica's decision."""
        seed = namespace_seed(ctx.model, ctx.adapter)
        self._book(ctx, worker, prompt_hash_array(ctx.token_ids, worker.block_size, seed)
                   if worker.block_size > 0 else None)

    def _book(self, ctx: RouteContext, worker: WorkerState, hashes: U64Array | None) -> None:
        if hashes is not None and len(hashes):
            # Pending until its events confirm the blocks or the request finishes:
            # however long it queues, the next request with this prefix follows it.
            self._index.mark_pending(worker.worker_id, hashes, self.params.pending_ttl_s)
            self._remember(ctx.request_id, worker.worker_id, hashes)

    def decide(self, ctx: RouteContext, workers: Sequence[WorkerState]
               ) -> tuple[Choice, U64Array | None]:
        """The choice and the prompt's hashes at the chosen worker's block size,
        without booking it (nothing marked pending): what ``choose`` picks."""
        ev = self.evaluate(ctx, workers)
        self.last = ev
        chosen = workers[ev.chosen]
        hits = int(ev.cached[ev.chosen])
        return (Choice(chosen, "kv_aware:prefix" if hits else "kv_aware:load", hits),
                ev.hashes_by_size.get(chosen.block_size))

    def evaluate(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Evaluation:
        """Every step of the decision over ``workers`` (nothing booked): what each
        holds, its load, who passes the load bound, their costs, the near-equals and
        the pick among them."""
        cached, hashes_by_size, sizes = self._match(ctx, workers)
        loads = load_arrays(workers, ctx.adapter, self.params.adapter_load_tokens,
                            kv_floor=self._held(workers))
        # The load bound, every kept worker's cost, and capacity-aware placement:
        # among the workers within a small slack of the best cost, prefer the prompt's
        # rendezvous "home". A prefix that is cold everywhere then always lands on the
        # same worker, so the fleet's caches partition the hot set instead of each
        # caching a copy of it (and thrashing when it outgrows one).
        kept, costs, near = near_equals(self.params, loads, len(ctx.token_ids), cached)
        uniform = next(iter(workers.size_set)) if isinstance(workers, Candidates) \
            and len(workers.size_set) == 1 else 0
        key = placement_key(hashes_by_size, sizes, near, cached, uniform)
        at = self._rng.choice(near.tolist()) if key is None else \
            rendezvous_pick(key, workers, near)
        return Evaluation(cached, loads, kept, costs, near, key, at, hashes_by_size)


class Evaluation(NamedTuple):
    """One decision's workings, per candidate in the candidates' order (``kept``,
    ``near`` and ``chosen`` are positions in it; ``costs`` is per kept candidate)."""

    cached: F64
    loads: LoadArrays
    kept: I64
    costs: F64
    near: I64
    placement_key: int | None
    chosen: int
    hashes_by_size: dict[int, U64Array]


def placement_key(hashes_by_size: dict[int, U64Array], sizes: I64, near: I64,
                  cached: F64, uniform: int = 0) -> int | None:
    """The prompt's placement key: its chained hash a few blocks past the longest
    prefix cached anywhere — the part that identifies what this prompt adds (a system
    prompt when nothing is cached; the tenant's document after a shared system prompt)
    — or None for sub-block prompts. Prompts that add the same content share a home;
    prompts that add different content spread over the near-equal workers.
    ``sizes`` and ``cached`` are every candidate's block size and cached prompt
    tokens; ``near`` the positions of the near-equal ones; ``uniform``, when not 0,
    the one block size every candidate has (no per-size masks to build)."""
    if uniform:
        size = uniform
    else:
        near_sizes = set(sizes[near].tolist())
        if len(near_sizes) != 1:
            return None
        size = near_sizes.pop()
    hashes = hashes_by_size.get(size)
    if hashes is None or not len(hashes):
        return None
    start = int((cached if uniform else cached[sizes == size]).max(initial=0)) // size
    return int(hashes[min(len(hashes), start + PLACEMENT_BLOCKS) - 1])


def rendezvous_score(key: int, worker_id: str) -> int:
    """Highest-random-weight score of ``worker_id`` for ``key``: splitmix64's finaliser
    over the key and the worker's salt (a few integer operations per candidate)."""
    x = key ^ worker_salt(worker_id)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
