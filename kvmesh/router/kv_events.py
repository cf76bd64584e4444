"""Follow a worker's VllmEngine.SubscribeKvEvents stream into the prefix index.

Per data-parallel rank, a cursor of the last sequence number applied
(``kv_sequence``): dropped, duplicated, reordered and replayed batches are told
apart by their numbers, and a lost tail by the servicer's heartbeats. A broken
stream is resumed from the cursor after checking the worker is the same incarnation
(its server's start time); a restarted worker, a publisher that refuses to resume
(OUT_OF_RANGE) or reports lost history (DATA_LOSS) makes the router drop the worker's
view and rebuild it from a fresh subscription — never serving stale hits as truth.
``KvEventTracker`` is the pure part (batches in, index updated); ``KvEventFollower``
is the stream around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from smg_grpc_proto import vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2

from kvmesh.router.kv_sequence import SequenceCursors, Verdict
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks
from kvmesh.router.snapshot import same_incarnation

log = logging.getLogger(__name__)


def stored_from_proto(event: common_pb2.KvBlocksStored, model: str,
                      default_block_size: int) -> StoredBlocks:
    tokens: list[int] = []
    block_size = default_block_size
    for block in event.blocks:
        tokens.extend(block.token_ids)
        block_size = block.block_size or block_size
    return StoredBlocks(
        engine_hashes=[b.block_hash for b in event.blocks],
        token_ids=tokens,
        block_size=block_size,
        parent_engine_hash=event.parent_block_hash if event.HasField("parent_block_hash")
        else None,
        model=model,
        adapter=event.lora_name if event.HasField("lora_name") else "",
    )


@dataclass
class FollowerStats:
    batches: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    gaps: int = 0
    resets: int = 0
    skipped: int = 0


def apply_batch(
    index: PrefixIndex, worker_id: str, model: str, block_size: int,
    batch: common_pb2.KvEventBatch, stats: FollowerStats,
) -> None:
    """Apply one batch's events to the index (pure over the index)."""
    for event in batch.events:
        kind = event.WhichOneof("data")
        if kind == "stored":
            stats.stored_blocks += index.stored(
                worker_id, stored_from_proto(event.stored, model, block_size))
        elif kind == "removed":
            index.removed(worker_id, event.removed.block_hashes)
            stats.removed_blocks += len(event.removed.block_hashes)
        elif kind == "cleared":
            index.clear_worker(worker_id)
    stats.batches += 1


class KvEventTracker:
    """One worker's KV events into the index: sequence checks, resets, metrics.

    Pure over the index (no I/O): the follower hands it every batch it reads and
    tells it when it subscribes again; property tests drive it with faulty streams.
    """

    def __init__(self, worker_id: str, index: PrefixIndex, model: str, block_size: int,
                 metrics: RouterMetrics | None = None, incarnation: float = 0.0) -> None:
        self.worker_id = worker_id
        self._index = index
        self._model = model
        self._block_size = block_size
        self._metrics = metrics
        #: The worker's start time as last seen (0: unknown); a change is a restart.
        self.incarnation = incarnation
        self.sequence = SequenceCursors()
        self.stats = FollowerStats()
        self._warned_unplaced = False

    def reset(self, why: str) -> None:
        log.warning("KV events of %s: %s; rebuilding its view", self.worker_id, why)
        self._index.clear_worker(self.worker_id)
        self._warned_unplaced = False
        self.stats.resets += 1
        if self._metrics is not None:
            self._metrics.kv_event_resets.inc()

    def resubscribing(self, incarnation: float | None) -> int:
        """The stream broke and is about to be opened again: the sequence number to
        resume from (0 after a restart: the old view is dropped)."""
        if incarnation is not None and incarnation and self.incarnation \
                and not same_incarnation(incarnation, self.incarnation):
            self.reset(f"restarted (incarnation {self.incarnation:.3f} -> {incarnation:.3f})")
            self.sequence.clear()
        if incarnation:
            self.incarnation = incarnation
        return self.sequence.resume_from()

    def lost_history(self, why: str) -> None:
        """The publisher cannot resume (OUT_OF_RANGE) or lost batches (DATA_LOSS)."""
        self.reset(why)
        self.sequence.clear()

    def handle(self, batch: common_pb2.KvEventBatch) -> Verdict:
        """Check one batch's number and apply its events when it is due."""
        rank = batch.dp_rank if batch.HasField("dp_rank") else 0
        load_only = batch.HasField("load") and batch.load.load_only
        verdict = self.sequence.admit(
            rank, batch.sequence_number, load_only=load_only,
            snapshot_chunk=batch.snapshot.index if batch.HasField("snapshot") else None)
        if verdict.gap:
            self.stats.gaps += 1
            if self._metrics is not None:
                self._metrics.kv_event_gaps.inc()
        if verdict.reset is not None:
            self.reset(verdict.reset)
        elif verdict.replace:
            self._index.clear_worker(self.worker_id)
        if not verdict.apply:
            self.stats.skipped += not load_only
            return verdict
        stored, removed = self.stats.stored_blocks, self.stats.removed_blocks
        unplaced = self._index.unknown_parent_blocks
        apply_batch(self._index, self.worker_id, self._model, self._block_size, batch,
                    self.stats)
        if self._index.unknown_parent_blocks > unplaced and not self._warned_unplaced:
            self._warned_unplaced = True  # once per view: descendants repeat it
            log.warning("KV events of %s: blocks whose parent block is not indexed (batch "
                        "%d); not indexed", self.worker_id, batch.sequence_number)
        self._observe(batch, stored, removed)
        return verdict

    def _observe(self, batch: common_pb2.KvEventBatch, stored: int, removed: int) -> None:
        if self._metrics is None:
            return
        self._metrics.kv_event_blocks.labels("stored").inc(self.stats.stored_blocks - stored)
        self._metrics.kv_event_blocks.labels("removed").inc(
            self.stats.removed_blocks - removed)
        if batch.timestamp > 0:
            self._metrics.kv_event_lag_seconds.observe(max(time.time() - batch.timestamp, 0))


class KvEventFollower:
    """The worker's SubscribeKvEvents stream, resumed when it breaks."""

    def __init__(
        self, worker_id: str, channel: grpc.aio.Channel, index: PrefixIndex, model: str,
        block_size: int, on_load: Callable[[common_pb2.EngineLoad], None] | None = None,
        retry_s: float = 0.5, metrics: RouterMetrics | None = None,
        incarnation: float = 0.0,
        probe_incarnation: Callable[[], Awaitable[float]] | None = None,
        idle_timeout_s: float = 15.0,
        on_break: Callable[[], None] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        self.tracker = KvEventTracker(worker_id, index, model, block_size, metrics,
                                      incarnation)
        self._on_load = on_load
        self._retry_s = retry_s
        self._probe_incarnation = probe_incarnation
        self._idle_timeout_s = idle_timeout_s
        #: Called when the stream breaks on a lost connection (the worker may be gone).
        self._on_break = on_break
        self.supported = True
        #: A subscription is open and has brought at least one message (a batch or a
        #: heartbeat): while it is, the worker is alive and its load arrives pushed.
        self.streaming = False

    @property
    def stats(self) -> FollowerStats:
        return self.tracker.stats

    async def _start(self, first: bool) -> int:
        if first or self._probe_incarnation is None:
            return self.tracker.sequence.resume_from()
        return self.tracker.resubscribing(await self._probe_incarnation())

    async def _follow(self, start: int) -> bool:
        """One subscription, until it ends, fails, or brings nothing (not even a
        heartbeat) for ``idle_timeout_s``: a stalled stream is dropped and resumed.
        True when it brought nothing at all (an idle worker whose relay sends no
        heartbeat before its first batch): the next one opens at once, since a batch
        published between the two subscriptions is lost for good."""
        call = self._stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(
            start_sequence_number=start, load_records_before_first_batch=True))
        received = False
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout_s):  # no task per read
                        batch = await call.read()
                except TimeoutError:
                    # An idle worker's relay sends its heartbeats only after a first
                    # batch: a stream that never brought one is resumed quietly.
                    log.log(logging.WARNING if received else logging.DEBUG,
                            "KV event stream of %s silent for %.0f s; resubscribing",
                            self.worker_id, self._idle_timeout_s)
                    return not received
                if batch is grpc.aio.EOF:
                    return False
                received = self.streaming = True
                if batch.HasField("load") and self._on_load is not None:
                    self._on_load(batch.load)
                self.tracker.handle(batch)
        finally:
            self.streaming = False
            call.cancel()

    async def run(self) -> None:
        first = True
        while True:
            try:
                start = await self._start(first)
                first = False
                if await self._follow(start):
                    continue
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("worker %s publishes no KV events; routing it by load only",
                             self.worker_id)
                    self.supported = False
                    return
                if code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS):
                    self.tracker.lost_history(f"{code.name}: {exc.details()}")
                else:
                    log.debug("KV event stream of %s broke: %s", self.worker_id, code.name)
                    if code == grpc.StatusCode.UNAVAILABLE and self._on_break is not None:
                        self._on_break()
            await asyncio.sleep(self._retry_s)
