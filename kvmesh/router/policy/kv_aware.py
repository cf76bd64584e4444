"""`kv_aware` (the default): precise prefix affinity from the KV index, priced by the
one cost model (``cost_model.py``), placed by rendezvous hashing among near-equals."""

from __future__ import annotations

import functools
import hashlib
import random
import time
from collections.abc import Sequence

from kvmesh.core.config import CostParams
from kvmesh.router.block_hash import U64Array, namespace_seed, prompt_hash_array
from kvmesh.router.cost_model import load_input, ttft_cost, within_bound
from kvmesh.router.policy.base import Choice, RouteContext
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.registry import WorkerState

PLACEMENT_BLOCKS = 4
MAX_REMEMBERED_MARKS = 65536
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
        return self._match(ctx, workers)[0]

    def _match(
        self, ctx: RouteContext, workers: Sequence[WorkerState]
    ) -> tuple[dict[str, int], dict[int, U64Array]]:
        """Prompt tokens each worker holds, and the prompt's block hashes per block
        size (what ``choose`` marks pending on the chosen worker)."""
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
        cached, hashes_by_size = self._match(ctx, workers)
        by_id = {w.worker_id: w for w in workers}
        tokens = self.params.adapter_load_tokens
        loads = within_bound(self.params,
                             [load_input(w, ctx.adapter, tokens) for w in workers])
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
