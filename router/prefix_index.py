"""Which worker holds which KV blocks (pure: no grpc, no vllm).

Keys are the router's own chained block hashes (``block_hash.py``); the engine's
hashes from KV events are mapped per worker, so the index never depends on the
engine's hash seed. Holders are bitmasks over worker slots, which makes the
longest-prefix match for every worker at once a walk of big-int ANDs.

Speculative insert: a routed prompt's blocks count as *pending* on the chosen
worker for a short TTL, until the engine's events confirm them — so a burst of
requests sharing a new prefix lands together instead of spraying. Marks sit at
checkpoints and on the prompt's tail (``mark_positions``), which chained hashes make
enough.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvmesh.router.block_hash import ROOT, ChainState, chain_arrays, namespace_seed

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _WorkerView:
    slot: int
    # engine block hash -> (router hash, chain sum after that block, chain length):
    # one flat tuple per cached block, the index's dominant memory and ingestion cost.
    engine_map: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    # router hash -> how many engine blocks map to it (several seeds/groups may)
    held: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredBlocks:
    """One BlockStored event, engine side."""

    engine_hashes: Sequence[int]
    token_ids: Sequence[int]  # all the blocks' tokens, concatenated
    block_size: int
    parent_engine_hash: int | None = None
    model: str = ""
    adapter: str = ""


_CHECKPOINT_STRIDE = 16


def checkpoints(n_blocks: int) -> list[int]:
    """Block positions a prompt is looked up at for pending marks: 0, 1, 3, 7, 15, then
    every 16th block, and the last one."""
    out: list[int] = []
    k = 1
    while k <= min(n_blocks, _CHECKPOINT_STRIDE):
        out.append(k - 1)
        k *= 2
    out.extend(range(2 * _CHECKPOINT_STRIDE - 1, n_blocks, _CHECKPOINT_STRIDE))
    if n_blocks and out[-1] != n_blocks - 1:
        out.append(n_blocks - 1)
    return out


def mark_positions(n_blocks: int) -> list[int]:
    """Where a routed prompt leaves pending marks: its checkpoints plus every block of
    its tail after the last full stride, so a later prompt that extends it (the next
    turn of a conversation) finds its exact length by scanning at most one stride."""
    marks = checkpoints(n_blocks)
    tail_start = max((n_blocks - 1) // _CHECKPOINT_STRIDE * _CHECKPOINT_STRIDE, 0)
    return sorted(set(marks) | set(range(tail_start, n_blocks)))


def pack_views(views: dict[str, dict[int, tuple[int, int, int]]]) -> dict[str, Arrays]:
    """Engine-hash maps as arrays: engine hashes (int64), router hashes, chain sums,
    chain lengths."""
    out = {}
    for worker_id, engine_map in views.items():
        n = len(engine_map)
        engine = np.fromiter(engine_map.keys(), np.int64, n)
        router = np.empty(n, np.uint64)
        totals = np.empty(n, np.uint64)
        blocks = np.empty(n, np.uint32)
        for i, entry in enumerate(engine_map.values()):
            router[i], totals[i], blocks[i] = entry
        out[worker_id] = (engine, router, totals, blocks)
    return out


def _bits(mask: int) -> Iterator[int]:
    """The set bit positions of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixIndex:
    def __init__(
        self, pending_ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._holders: dict[int, int] = {}
        # Speculative blocks: hash -> worker-slot bitmask, the latest expiry per hash,
        # and marks in expiry order (swept lazily, so marking stays a few dict ops).
        self._pending: dict[int, int] = {}
        self._pending_until: dict[int, float] = {}
        self._pending_marks: deque[tuple[float, int, list[int]]] = deque()
        self._views: dict[str, _WorkerView] = {}
        self._free: list[int] = []  # slots of removed workers, reused first
        self._pending_ttl_s = pending_ttl_s
        self._clock = clock
        self.unknown_parent_blocks = 0

    # ---- workers ---------------------------------------------------------------
    def _view(self, worker_id: str) -> _WorkerView:
        view = self._views.get(worker_id)
        if view is None:
            # Slots 0..len-1 are all taken when none was freed.
            slot = self._free.pop() if self._free else len(self._views)
            view = self._views[worker_id] = _WorkerView(slot)
        return view

    def clear_worker(self, worker_id: str) -> None:
        """Forget what a worker holds (cache cleared, or a gap in its events)."""
        view = self._views.get(worker_id)
        if view is None:
            return
        bit = 1 << view.slot
        for router_hash in view.held:
            self._drop_bit(router_hash, bit)
        view.held.clear()
        view.engine_map.clear()

    def remove_worker(self, worker_id: str) -> None:
        self.clear_worker(worker_id)
        view = self._views.pop(worker_id, None)
        if view is not None:
            bit = 1 << view.slot
            for router_hash in [h for h, m in self._pending.items() if m & bit]:
                self._drop_pending(router_hash, bit)
            self._free.append(view.slot)

    def _drop_bit(self, router_hash: int, bit: int) -> None:
        mask = self._holders.get(router_hash, 0) & ~bit
        if mask:
            self._holders[router_hash] = mask
        else:
            self._holders.pop(router_hash, None)

    # ---- events ----------------------------------------------------------------
    def stored(self, worker_id: str, event: StoredBlocks) -> int:
        """Apply a BlockStored event; returns how many blocks were indexed."""
        view = self._view(worker_id)
        parent = ROOT
        if event.parent_engine_hash is not None:
            known = view.engine_map.get(event.parent_engine_hash)
            if known is None:
                # The chain's start is unknown (missed events): these blocks cannot
                # be placed, and guessing would serve stale hits as truth.
                self.unknown_parent_blocks += len(event.engine_hashes)
                return 0
            parent = ChainState(known[1], known[2])
        seed = namespace_seed(event.model, event.adapter)
        hashes, sums = chain_arrays(event.token_ids, event.block_size, seed, parent)
        count = min(len(hashes), len(event.engine_hashes))
        bit = 1 << view.slot
        for engine_hash, router_hash, total, length in zip(
            list(event.engine_hashes[:count]), hashes[:count].tolist(), sums[:count].tolist(),
            range(parent.blocks + 1, parent.blocks + count + 1), strict=True,
        ):
            if engine_hash in view.engine_map:
                continue
            view.engine_map[engine_hash] = (router_hash, total, length)
            view.held[router_hash] = view.held.get(router_hash, 0) + 1
            self._holders[router_hash] = self._holders.get(router_hash, 0) | bit
            if router_hash in self._pending:
                self._drop_pending(router_hash, bit)
        return count

    def removed(self, worker_id: str, engine_hashes: Iterable[int]) -> None:
        view = self._views.get(worker_id)
        if view is None:
            return
        bit = 1 << view.slot
        for engine_hash in engine_hashes:
            entry = view.engine_map.pop(engine_hash, None)
            if entry is None:
                continue
            router_hash = entry[0]
            left = view.held.get(router_hash, 0) - 1
            if left > 0:
                view.held[router_hash] = left
            else:
                view.held.pop(router_hash, None)
                self._drop_bit(router_hash, bit)

    # ---- routing ---------------------------------------------------------------
    def mark_pending(self, worker_id: str, hashes: Sequence[int]) -> None:
        view = self._view(worker_id)
        now = self._clock()
        self._sweep(now)
        expiry = now + self._pending_ttl_s
        bit = 1 << view.slot
        holders, pending, until = self._holders, self._pending, self._pending_until
        marked = []
        for position in mark_positions(len(hashes)):
            router_hash = hashes[position]
            if holders.get(router_hash, 0) & bit:
                continue
            pending[router_hash] = pending.get(router_hash, 0) | bit
            until[router_hash] = expiry
            marked.append(router_hash)
        if marked:
            self._pending_marks.append((expiry, bit, marked))

    def _drop_pending(self, router_hash: int, bit: int) -> None:
        mask = self._pending.get(router_hash, 0) & ~bit
        if mask:
            self._pending[router_hash] = mask
        else:
            self._pending.pop(router_hash, None)
            self._pending_until.pop(router_hash, None)

    def _sweep(self, now: float) -> None:
        """Expire old marks. A hash marked again later keeps its bits (pending is a
        hint that lasts at least the TTL)."""
        marks = self._pending_marks
        while marks and marks[0][0] < now:
            _, bit, hashes = marks.popleft()
            for router_hash in hashes:
                if self._pending_until.get(router_hash, now) < now:
                    self._drop_pending(router_hash, bit)

    def match(self, hashes: Sequence[int], worker_ids: Iterable[str]) -> dict[str, int]:
        """Longest cached prefix, in blocks, of ``hashes`` on each of ``worker_ids``."""
        ids = list(worker_ids)
        owner = {self._views[w].slot: w for w in ids if w in self._views}
        depth = dict.fromkeys(owner.values(), 0)
        alive = 0
        for slot in owner:
            alive |= 1 << slot
        now = self._clock()
        self._sweep(now)
        holders = self._holders
        blocks = 0
        for router_hash in hashes:
            still = alive & holders.get(router_hash, 0)
            if still != alive:
                for slot in _bits(alive & ~still):
                    depth[owner[slot]] = blocks
                alive = still
                if not alive:
                    break
            blocks += 1
        for slot in _bits(alive):
            depth[owner[slot]] = blocks
        if self._pending:
            self._match_pending(hashes, owner, depth, now)
        return {w: depth.get(w, 0) for w in ids}

    def _match_pending(self, hashes: Sequence[int], owner: dict[int, str],
                       depth: dict[str, int], now: float) -> None:
        """Deepen ``depth`` with pending marks. Marks sit at checkpoints; a chained hash
        pending at position p means the worker will hold the whole prefix up to p."""
        pending, until = self._pending, self._pending_until
        seen: dict[int, int] = {}

        def marked(position: int) -> int:
            mask = seen.get(position)
            if mask is None:
                h = hashes[position]
                mask = pending.get(h, 0)
                if mask and until.get(h, 0.0) < now:
                    mask = 0
                seen[position] = mask
            return mask

        for position in checkpoints(len(hashes)):
            for slot in _bits(marked(position)):
                w = owner.get(slot)
                if w is not None and depth[w] <= position:
                    depth[w] = position + 1
        # Past a worker's deepest checkpoint, follow its marks block by block (the
        # tail of a pending prompt this one extends) for at most one stride.
        for slot, w in owner.items():
            position = depth[w]
            stop = min(len(hashes), position + _CHECKPOINT_STRIDE)
            while position < stop and marked(position) >> slot & 1:
                position += 1
            depth[w] = position

    # ---- snapshots -------------------------------------------------------------
    def export_views(self) -> dict[str, dict[int, tuple[int, int, int]]]:
        """Shallow copies of each worker's engine-hash map: cheap enough to take on the
        event loop; pack them (``pack_views``) elsewhere."""
        return {w: dict(v.engine_map) for w, v in self._views.items() if v.engine_map}

    def export(self) -> dict[str, Arrays]:
        """Per worker: engine hashes (int64), router hashes, chain sums, chain lengths."""
        return pack_views(self.export_views())

    def load(self, worker_id: str, engine: np.ndarray, router: np.ndarray,
             totals: np.ndarray, blocks: np.ndarray) -> int:
        """Replace a worker's view with exported arrays."""
        self.clear_worker(worker_id)
        view = self._view(worker_id)
        bit = 1 << view.slot
        for engine_hash, router_hash, total, count in zip(
            engine.tolist(), router.tolist(), totals.tolist(), blocks.tolist(), strict=True
        ):
            view.engine_map[engine_hash] = (router_hash, total, count)
            view.held[router_hash] = view.held.get(router_hash, 0) + 1
            self._holders[router_hash] = self._holders.get(router_hash, 0) | bit
        return len(engine)

    # ---- introspection -------------------------------------------------------
    def blocks(self, worker_id: str) -> int:
        view = self._views.get(worker_id)
        return len(view.held) if view else 0

    def __len__(self) -> int:
        return len(self._holders)
