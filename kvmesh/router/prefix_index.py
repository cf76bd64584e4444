"""Which worker holds which KV blocks (pure: no grpc, no vllm).

Keys are the router's own chained block hashes (``block_hash.py``); the engine's
hashes from KV events are mapped per worker, so the index never depends on the
engine's hash seed. All of it lives in flat numpy tables driven by compiled kernels
(``kernels/tables.py``, ``kernels/pending.py``): a *holder* table (router hash ->
bitmask of worker slots, which makes the longest-prefix match for every worker at
once one walk of the prompt) and one *engine* table per worker (engine hash -> chain
sum and length, from which the router hash follows). About 80 bytes per indexed block
and no Python objects per block, so the garbage collector never pauses a routing
decision.

Speculative insert: a routed prompt's blocks count as *pending* on the chosen
worker until the engine's events confirm them or the request ends (the policy clears
them), for at most the TTL the caller gives (``RouterConfig.cost.pending_ttl_s``; the
index has none of its own) — so a burst of requests sharing a new prefix lands
together instead of spraying, however long the first one queues. Marks sit at
checkpoints and on the prompt's tail (``mark_positions``), which chained hashes make
enough.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvmesh.router.block_hash import ROOT, ChainState, TokenIds, chain_arrays, namespace_seed
from kvmesh.router.kernels import pending, tables
from kvmesh.router.marks import CHECKPOINT_STRIDE, block_positions

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# Tables grow (double) past this load factor; linear probing stays short below it.
MAX_LOAD = 0.7
_MIN_CAPACITY = 64


def _capacity(entries: int) -> int:
    capacity = _MIN_CAPACITY
    while entries > capacity * MAX_LOAD:
        capacity *= 2
    return capacity


class _EngineTable:
    """One worker's engine hash -> (chain sum, chain length) table."""

    __slots__ = ("keys", "sums", "lens", "count")

    def __init__(self, capacity: int = _MIN_CAPACITY) -> None:
        self.keys = np.zeros(capacity, np.uint64)
        self.sums = np.zeros(capacity, np.uint64)
        self.lens = np.zeros(capacity, np.uint32)
        self.count = 0

    def reserve(self, more: int) -> None:
        if self.count + more <= len(self.keys) * MAX_LOAD:
            return
        bigger = _EngineTable(_capacity(self.count + more))
        tables.rehash_engine(self.keys, self.sums, self.lens,
                              bigger.keys, bigger.sums, bigger.lens)
        self.keys, self.sums, self.lens = bigger.keys, bigger.sums, bigger.lens

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.keys, self.sums, self.lens


@dataclass
class _WorkerView:
    slot: int
    table: _EngineTable = field(default_factory=_EngineTable)
    # Router hashes this worker holds under more than one engine hash (several seeds or
    # KV groups may map to one): the extra count, so a removal keeps the bit. Rare.
    extra: dict[int, int] = field(default_factory=dict)
    #: Its slot's word and bit in the tables' masks (a view keeps its slot for life;
    #: worked out once, since every routed request reads them).
    word: int = field(init=False)
    bit: np.uint64 = field(init=False)

    def __post_init__(self) -> None:
        self.word = self.slot >> 6
        self.bit = np.uint64(1 << (self.slot & 63))


@dataclass(frozen=True)
class StoredBlocks:
    """One BlockStored event, engine side."""

    engine_hashes: Sequence[int]
    token_ids: TokenIds  # all the blocks' tokens, concatenated
    block_size: int
    parent_engine_hash: int | None = None
    model: str = ""
    adapter: str = ""


Views = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def pack_views(views: Views) -> dict[str, Arrays]:
    """Engine tables (``export_views``) as arrays: engine hashes (int64), router
    hashes, chain sums, chain lengths. Runs off the event loop (the kernel drops the
    GIL)."""
    out = {}
    for worker_id, (keys, sums, lens) in views.items():
        engine, router, totals, lengths = tables.engine_items(keys, sums, lens)
        out[worker_id] = (engine.view(np.int64), router, totals, lengths)
    return out


def as_hash_array(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Router hashes as a uint64 array (no copy when they already are one)."""
    if isinstance(hashes, np.ndarray):
        return hashes.astype(np.uint64, copy=False)
    return np.array(hashes, dtype=np.uint64)


def _engine_keys(engine_hashes: Iterable[int]) -> np.ndarray:
    """Engine hashes as uint64 keys; engines report them signed or unsigned."""
    values = list(engine_hashes)
    try:
        return np.array(values, dtype=np.uint64)
    except OverflowError:
        return np.array([h & 0xFFFF_FFFF_FFFF_FFFF for h in values], dtype=np.uint64)


class PrefixIndex:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # The holder table: router hash -> worker-slot bitmask (one uint64 per 64 slots).
        self._keys = np.zeros(_MIN_CAPACITY, np.uint64)
        self._masks = np.zeros((_MIN_CAPACITY, 1), np.uint64)
        self._count = 0
        # Speculative blocks: the same layout plus an expiry per row.
        self._pkeys = np.zeros(_MIN_CAPACITY, np.uint64)
        self._pmasks = np.zeros((_MIN_CAPACITY, 1), np.uint64)
        self._pexpiry = np.zeros(_MIN_CAPACITY)
        self._pcount = 0
        self._views: dict[str, _WorkerView] = {}
        # worker id -> its view's slot (-1: none, kept until the worker is removed).
        self._slots: defaultdict[str, int] = defaultdict(lambda: -1)
        self._free: list[int] = []  # slots of removed workers, reused first
        self._slot_version = 0  # bumped when a slot is given or taken back
        self._live_kept: tuple[Sequence[str], tuple[int, int], Any] | None = None
        self._clock = self.clock = clock
        self.unknown_parent_blocks = 0

    # ---- tables ----------------------------------------------------------------
    def _reserve(self, more: int, words: int) -> None:
        """Room for ``more`` holder rows and ``words`` mask words per row."""
        capacity, old_words = self._masks.shape
        if self._count + more <= capacity * MAX_LOAD and words <= old_words:
            return
        capacity = max(capacity, _capacity(self._count + more))
        keys = np.zeros(capacity, np.uint64)
        masks = np.zeros((capacity, max(words, old_words)), np.uint64)
        tables.rehash_holders(self._keys, self._masks, keys, masks)
        self._keys, self._masks = keys, masks

    def _set(self, view: _WorkerView, router_hashes: np.ndarray) -> None:
        """Mark ``router_hashes`` held by ``view``'s worker."""
        self._reserve(len(router_hashes), view.word + 1)
        seen = np.empty(len(router_hashes), np.bool_)
        self._count += tables.holder_set(self._keys, self._masks, router_hashes,
                                          view.word, view.bit, seen)
        if seen.any():
            for router_hash in router_hashes[seen].tolist():
                view.extra[router_hash] = view.extra.get(router_hash, 0) + 1
        if self._pcount and view.word < self._pmasks.shape[1]:
            pending.pending_clear(self._pkeys, self._pmasks, router_hashes, view.word,
                                  view.bit)

    def _clear(self, view: _WorkerView, router_hashes: np.ndarray) -> None:
        """Drop ``view``'s hold on ``router_hashes`` (one engine block each)."""
        if view.extra:
            kept = []
            for router_hash in router_hashes.tolist():
                left = view.extra.get(router_hash, 0)
                if left > 1:
                    view.extra[router_hash] = left - 1
                elif left == 1:
                    del view.extra[router_hash]
                else:
                    kept.append(router_hash)
            router_hashes = np.array(kept, dtype=np.uint64)
        if view.word < self._masks.shape[1]:
            self._count -= tables.holder_clear(self._keys, self._masks, router_hashes,
                                                view.word, view.bit)

    # ---- workers ---------------------------------------------------------------
    def _view(self, worker_id: str) -> _WorkerView:
        view = self._views.get(worker_id)
        if view is None:
            # Slots 0..len-1 are all taken when none was freed.
            slot = self._free.pop() if self._free else len(self._views)
            view = self._views[worker_id] = _WorkerView(slot)
            self._slots[worker_id] = slot
            self._slot_version += 1
        return view

    def clear_worker(self, worker_id: str) -> None:
        """Forget what a worker holds (cache cleared, or a gap in its events)."""
        view = self._views.get(worker_id)
        if view is None:
            return
        router = tables.engine_items(*view.table.arrays)[1]
        view.extra.clear()
        self._clear(view, router)
        view.table = _EngineTable()

    def remove_worker(self, worker_id: str) -> None:
        self.clear_worker(worker_id)
        view = self._views.pop(worker_id, None)
        self._slots.pop(worker_id, None)
        self._slot_version += 1
        if view is not None:
            if view.word < self._pmasks.shape[1]:
                pending.pending_clear_slot(self._pmasks, view.word, view.bit)
            self._free.append(view.slot)

    # ---- events ----------------------------------------------------------------
    def stored(self, worker_id: str, event: StoredBlocks) -> int:
        """Apply a BlockStored event; returns how many blocks were indexed."""
        view = self._view(worker_id)
        table = view.table
        parent = ROOT
        if event.parent_engine_hash is not None:
            total, length = tables.engine_get(
                *table.arrays, _engine_keys([event.parent_engine_hash])[0])
            if length < 0:
                # The chain's start is unknown (missed events): these blocks cannot
                # be placed, and guessing would serve stale hits as truth.
                self.unknown_parent_blocks += len(event.engine_hashes)
                return 0
            parent = ChainState(int(total), length)
        seed = namespace_seed(event.model, event.adapter)
        hashes, sums = chain_arrays(event.token_ids, event.block_size, seed, parent)
        engine = _engine_keys(event.engine_hashes)
        count = min(len(hashes), len(engine))
        table.reserve(count)
        fresh = np.empty(count, np.bool_)
        table.count += tables.engine_put(*table.arrays, engine[:count], sums[:count],
                                          parent.blocks + 1, fresh)
        self._set(view, hashes[:count][fresh])
        return count

    def removed(self, worker_id: str, engine_hashes: Iterable[int]) -> None:
        view = self._views.get(worker_id)
        if view is None:
            return
        engine = _engine_keys(engine_hashes)
        router = np.empty(len(engine), np.uint64)
        popped = tables.engine_pop(*view.table.arrays, engine, router)
        view.table.count -= popped
        self._clear(view, router[:popped])

    # ---- routing ---------------------------------------------------------------
    def mark_pending(self, worker_id: str, hashes: Sequence[int] | np.ndarray,
                     ttl_s: float) -> None:
        """Count the prompt's blocks (at ``mark_positions``) as cached on the worker
        until ``ttl_s`` passes or its events confirm them (the policy also clears them
        when the request finishes; ``RouterConfig.cost.pending_ttl_s`` bounds lost
        finishes)."""
        view = self._view(worker_id)
        now = self._clock()
        positions = block_positions(len(hashes), True)
        self._reserve(0, view.word + 1)
        self._reserve_pending(len(positions), view.word + 1, now)
        self._pcount += pending.pending_mark(
            self._pkeys, self._pmasks, self._pexpiry, self._keys, self._masks,
            as_hash_array(hashes), positions, view.word, view.bit, now,
            now + ttl_s)

    def clear_pending(self, worker_id: str, hashes: Sequence[int] | np.ndarray) -> None:
        """Drop the worker's pending marks of the prompt's blocks (its request ended)."""
        view = self._views.get(worker_id)
        if view is None or not self._pcount or view.word >= self._pmasks.shape[1]:
            return
        positions = block_positions(len(hashes), True)
        pending.pending_clear(self._pkeys, self._pmasks, as_hash_array(hashes)[positions],
                              view.word, view.bit)

    def _reserve_pending(self, more: int, words: int, now: float) -> None:
        capacity, old_words = self._pmasks.shape
        if self._pcount + more <= capacity * MAX_LOAD and words <= old_words:
            return
        # Rebuild without expired rows, bigger only when the live ones need it.
        capacity = _capacity(self._pcount + more)
        keys, expiry = np.zeros(capacity, np.uint64), np.zeros(capacity)
        masks = np.zeros((capacity, max(words, old_words)), np.uint64)
        self._pcount = pending.rehash_pending(self._pkeys, self._pmasks, self._pexpiry, now,
                                              keys, masks, expiry)
        self._pkeys, self._pmasks, self._pexpiry = keys, masks, expiry

    def match(self, hashes: Sequence[int] | np.ndarray,
              worker_ids: Iterable[str], pending_marks: bool = True) -> dict[str, int]:
        """Longest cached prefix, in blocks, of ``hashes`` on each of ``worker_ids``:
        blocks its events confirmed, deepened by its unexpired pending marks (unless
        ``pending_marks`` is false: what the events alone say)."""
        ids = list(worker_ids)
        return dict(zip(ids, self.match_array(hashes, ids, pending_marks).tolist(),
                        strict=True))

    def match_array(self, hashes: Sequence[int] | np.ndarray,
                    worker_ids: Sequence[str], pending_marks: bool = True) -> np.ndarray:
        """``match`` as an int array in ``worker_ids``' order: the ids' slots looked
        up in one C-level pass and the rest in numpy (no Python per worker)."""
        live = self._live(worker_ids)
        if live is None:
            return np.zeros(len(worker_ids), np.int64)
        at, held, alive = live
        array = as_hash_array(hashes)
        with_pending = bool(self._pcount and pending_marks)
        return pending.match_counts(
            self._keys, self._masks, self._pkeys, self._pmasks, self._pexpiry,
            self._clock() if with_pending else 0.0, with_pending, array,
            block_positions(len(array), False), CHECKPOINT_STRIDE, alive, at, held)

    def _live(self, worker_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray,
                                                         np.ndarray] | None:
        """Where each id's count is read (its slot, 0 for none), which ids the table is
        wide enough to hold (no slot: -1), and the bitmask words of those: None when
        none is. Kept while the same id list (a candidate selection's, the same object
        decision after decision) meets the same slots and table width."""
        kept, version = self._live_kept, (self._slot_version, self._masks.shape[1])
        if kept is not None and kept[0] is worker_ids and kept[1] == version:
            return kept[2]
        slots = np.fromiter(map(self._slots.__getitem__, worker_ids), np.int64,
                            len(worker_ids))
        held = (slots >= 0) & (slots < 64 * version[1])
        live = None
        if held.any():
            bits = slots[held].astype(np.uint64)
            alive = np.zeros(version[1], np.uint64)
            np.bitwise_or.at(alive, (bits >> np.uint64(6)).astype(np.intp),
                             np.left_shift(np.uint64(1), bits & np.uint64(63)))
            live = np.where(held, slots, 0), held, alive
        self._live_kept = (worker_ids, version, live)
        return live

    # ---- snapshots -------------------------------------------------------------
    def export_views(self) -> Views:
        """Copies of each worker's engine table: a memcpy, cheap enough to take on the
        event loop; pack them (``pack_views``) elsewhere."""
        return {w: (v.table.keys.copy(), v.table.sums.copy(), v.table.lens.copy())
                for w, v in self._views.items() if v.table.count}

    def export(self) -> dict[str, Arrays]:
        """Per worker: engine hashes (int64), router hashes, chain sums, chain lengths."""
        return pack_views(self.export_views())

    def load(self, worker_id: str, engine: np.ndarray, router: np.ndarray,
             totals: np.ndarray, blocks: np.ndarray) -> int:
        """Replace a worker's view with exported arrays."""
        self.clear_worker(worker_id)
        view = self._view(worker_id)
        keys = engine.view(np.uint64) if engine.dtype == np.int64 else _engine_keys(engine)
        view.table.reserve(len(keys))
        tables.engine_put_states(*view.table.arrays, keys, totals.astype(np.uint64),
                                  blocks.astype(np.uint32))
        view.table.count = len(keys)
        self._set(view, router.astype(np.uint64))
        return len(keys)

    # ---- introspection -------------------------------------------------------
    def blocks(self, worker_id: str) -> int:
        """Distinct blocks a worker holds."""
        view = self._views.get(worker_id)
        return view.table.count - sum(view.extra.values()) if view else 0

    def nbytes(self) -> int:
        """Bytes held by the index's tables."""
        tables = [self._keys, self._masks, self._pkeys, self._pmasks, self._pexpiry]
        for view in self._views.values():
            tables.extend(view.table.arrays)
        return sum(t.nbytes for t in tables)

    def __len__(self) -> int:
        return self._count
