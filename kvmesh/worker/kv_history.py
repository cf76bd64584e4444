"""What a worker keeps of its KV-event stream, so a subscriber can resume (pure).

The library's relay keeps nothing between subscriptions: a subscriber whose stream
broke had to start over from zero and learned only blocks stored after that, so the
router lost sight of every block the worker still held. A worker now follows its
engine's events once, for its whole life (``kvmesh.worker.kv_fanout``), and this
record answers a new subscription:

- ``since(start)``: the batches from ``start`` on, while they are still in the
  bounded history (a stream resumed where it broke: nothing lost, nothing reset);
- ``snapshot()``: the blocks the engine holds now, as ``KvSnapshotChunk`` batches
  numbered with the last sequence applied (a fresh subscription, or one whose
  cursor has rolled out of the history): the subscriber replaces its view with it
  and follows the live batches from the next number on.

One data-parallel rank per record (a kvmesh worker is one engine, one rank); load-only
heartbeats and snapshot chunks are not history.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field

from smg_grpc_proto.generated import common_pb2

#: Batches kept for resuming (a few minutes of a busy engine's steps)...
HISTORY_BATCHES = 4096
#: ...and at most this many stored blocks in them (their token ids are the bulk).
HISTORY_BLOCKS = 65_536
#: Blocks per snapshot chunk (one KvEventBatch each).
SNAPSHOT_CHUNK_BLOCKS = 1024


@dataclass
class _Held:
    """One block hash the engine holds: its store (the event's fields, the block,
    its parent) and how many physical copies of it are live."""

    template: common_pb2.KvBlocksStored
    block: common_pb2.KvBlock
    parent: int | None
    copies: int = 1


@dataclass
class KvHistory:
    """The live blocks and the recent batches of one rank's stream."""

    max_batches: int = HISTORY_BATCHES
    max_blocks: int = HISTORY_BLOCKS
    #: Sequence number of the last batch applied (None: none yet).
    last: int | None = None
    #: Publisher batches before this record began that it never saw (0: it saw all).
    unknown_before: int = 0
    _held: dict[int, _Held] = field(default_factory=dict)
    _batches: deque[common_pb2.KvEventBatch] = field(default_factory=deque)
    #: Stored blocks in ``_batches`` (each batch's count, to drop it by).
    _sizes: deque[int] = field(default_factory=deque)
    _history_blocks: int = 0

    @property
    def blocks(self) -> int:
        """Live blocks, physical copies counted."""
        return sum(h.copies for h in self._held.values())

    def record(self, batch: common_pb2.KvEventBatch) -> None:
        """Apply one relayed batch (heartbeats and snapshot chunks are skipped)."""
        if (batch.HasField("load") and batch.load.load_only) or batch.HasField("snapshot"):
            return
        if self.last is None and batch.sequence_number > 1:
            self.unknown_before = batch.sequence_number - 1
        size = 0  # stored blocks, the history's bound
        for event in batch.events:
            kind = event.WhichOneof("data")
            if kind == "stored":
                self._stored(event.stored)
                size += len(event.stored.blocks)
            elif kind == "removed":
                for block_hash in event.removed.block_hashes:
                    self._removed(block_hash)
            elif kind == "cleared":
                self._held.clear()
        self.last = batch.sequence_number
        self._batches.append(batch)
        self._sizes.append(size)
        self._history_blocks += size
        while len(self._batches) > 1 and (len(self._batches) > self.max_batches
                                          or self._history_blocks > self.max_blocks):
            self._batches.popleft()
            self._history_blocks -= self._sizes.popleft()

    def _stored(self, stored: common_pb2.KvBlocksStored) -> None:
        template = common_pb2.KvBlocksStored()
        template.CopyFrom(stored)
        template.ClearField("blocks")
        template.ClearField("parent_block_hash")
        parent = stored.parent_block_hash if stored.HasField("parent_block_hash") else None
        for block in stored.blocks:
            held = self._held.get(block.block_hash)
            if held is not None:
                held.copies += 1
            else:
                self._held[block.block_hash] = _Held(template, block, parent)
            parent = block.block_hash

    def _removed(self, block_hash: int) -> None:
        held = self._held.get(block_hash)
        if held is None:
            return
        held.copies -= 1
        if held.copies <= 0:
            del self._held[block_hash]

    def _parents_first(self) -> list[_Held]:
        """The held blocks, each after its parent when that is held too (a parent
        evicted and stored again comes after its children in storing order)."""
        done: set[int] = set()
        out: list[_Held] = []
        for first in self._held:
            chain = []
            at: int | None = first
            while at is not None and at in self._held and at not in done:
                done.add(at)
                chain.append(self._held[at])
                at = self._held[at].parent
            out.extend(reversed(chain))
        return out

    def since(self, start: int) -> list[common_pb2.KvEventBatch] | None:
        """The batches numbered ``start`` and after; None when they are no longer
        (or were never) all here."""
        if self.last is None:
            return None
        if start == self.last + 1:
            return []
        if not self._batches or start > self.last or start < self._batches[0].sequence_number:
            return None
        # Numbers only grow within a record (a publisher that restarts its count ends
        # the relay, and the record with it), but the relay may skip one (a batch with
        # nothing it forwards): the replay starts at ``start`` itself or not at all.
        at = bisect.bisect_left(self._batches, start, key=lambda b: b.sequence_number)
        if self._batches[at].sequence_number != start:
            return None
        return list(itertools.islice(self._batches, at, None))

    def snapshot(self, rank: int | None = None,
                 chunk_blocks: int = SNAPSHOT_CHUNK_BLOCKS) -> list[common_pb2.KvEventBatch]:
        """The live blocks as snapshot chunks (parents before children, as stored),
        each numbered with the last sequence applied; one empty chunk when nothing
        is held. Empty when no batch was ever applied (nothing to number it by)."""
        if self.last is None:
            return []
        stores: list[common_pb2.KvCacheEvent] = []
        for held in self._parents_first():
            for _ in range(held.copies):
                event = common_pb2.KvCacheEvent()
                event.stored.CopyFrom(held.template)
                event.stored.blocks.append(held.block)
                if held.parent is not None:
                    event.stored.parent_block_hash = held.parent
                stores.append(event)
        chunks = [stores[i:i + chunk_blocks] for i in range(0, len(stores), chunk_blocks)]
        chunks = chunks or [[]]
        out = []
        for index, events in enumerate(chunks):
            batch = common_pb2.KvEventBatch(sequence_number=self.last, events=events)
            if rank is not None:
                batch.dp_rank = rank
            batch.snapshot.index = index
            batch.snapshot.count = len(chunks)
            batch.snapshot.blocks = len(stores)
            batch.snapshot.unknown_before = self.unknown_before
            out.append(batch)
        return out
