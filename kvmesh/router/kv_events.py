"""Follow a worker's VllmEngine.SubscribeKvEvents stream into the prefix index.

Per data-parallel rank, a cursor of the last sequence number applied. A broken
stream is resumed from that cursor; a publisher that refuses to resume
(OUT_OF_RANGE), reports lost history (DATA_LOSS), restarts its numbering or skips
a number makes the router drop the worker's view and rebuild it from a fresh
subscription — never serving stale hits as truth.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from smg_grpc_proto import vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2

from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks

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
    #: Last sequence number applied, per data-parallel rank of the engine.
    cursors: dict[int, int] = field(default_factory=dict)
    stored_blocks: int = 0
    removed_blocks: int = 0
    gaps: int = 0
    resets: int = 0


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


class KvEventFollower:
    def __init__(
        self, worker_id: str, channel: grpc.aio.Channel, index: PrefixIndex, model: str,
        block_size: int, on_load: Callable[[common_pb2.EngineLoad], None] | None = None,
        retry_s: float = 0.5, metrics: RouterMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self.worker_id = worker_id
        self._stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        self._index = index
        self._model = model
        self._block_size = block_size
        self._on_load = on_load
        self._retry_s = retry_s
        self.stats = FollowerStats()
        self.supported = True

    def _reset(self, why: str) -> None:
        log.warning("KV events of %s: %s; rebuilding its view", self.worker_id, why)
        self._index.clear_worker(self.worker_id)
        self.stats.cursors.clear()
        self.stats.resets += 1
        if self._metrics is not None:
            self._metrics.kv_event_resets.inc()

    def _admit(self, batch: common_pb2.KvEventBatch) -> bool:
        """Sequence bookkeeping per rank; False for a duplicate to skip."""
        rank = batch.dp_rank if batch.HasField("dp_rank") else 0
        seq = batch.sequence_number
        last = self.stats.cursors.get(rank)
        if last is not None:
            if seq <= last:
                if seq < last and not batch.HasField("snapshot"):
                    self._reset(f"rank {rank} restarted its numbering ({last} -> {seq})")
                else:
                    return False
            elif seq > last + 1:
                self.stats.gaps += 1
                if self._metrics is not None:
                    self._metrics.kv_event_gaps.inc()
                self._reset(f"gap on rank {rank} ({last} -> {seq})")
        self.stats.cursors[rank] = seq
        return True

    def _observe(self, batch: common_pb2.KvEventBatch, stored: int, removed: int) -> None:
        if self._metrics is None:
            return
        self._metrics.kv_event_blocks.labels("stored").inc(self.stats.stored_blocks - stored)
        self._metrics.kv_event_blocks.labels("removed").inc(
            self.stats.removed_blocks - removed)
        if batch.timestamp > 0:
            self._metrics.kv_event_lag_seconds.observe(max(time.time() - batch.timestamp, 0))

    async def run(self) -> None:
        while True:
            start = max(self.stats.cursors.values()) + 1 if len(self.stats.cursors) == 1 else 0
            try:
                async for batch in self._stub.SubscribeKvEvents(
                    common_pb2.SubscribeKvEventsRequest(
                        start_sequence_number=start, load_records_before_first_batch=True)
                ):
                    if batch.HasField("load") and self._on_load is not None:
                        self._on_load(batch.load)
                    if batch.HasField("load") and batch.load.load_only:
                        continue
                    if self._admit(batch):
                        stored, removed = self.stats.stored_blocks, self.stats.removed_blocks
                        apply_batch(self._index, self.worker_id, self._model,
                                    self._block_size, batch, self.stats)
                        self._observe(batch, stored, removed)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("worker %s publishes no KV events; routing it by load only",
                             self.worker_id)
                    self.supported = False
                    return
                if code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS):
                    self._reset(f"{code.name}: {exc.details()}")
                else:
                    log.debug("KV event stream of %s broke: %s", self.worker_id, code.name)
            await asyncio.sleep(self._retry_s)
