"""The worker's record of its KV-event stream: what a resumed subscriber is replayed,
and what a fresh one is given as a snapshot, against a simulated engine cache and the
router's own event tracker."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smg_grpc_proto.generated import common_pb2

from kvmesh.router.block_hash import namespace_seed, prompt_hashes
from kvmesh.router.kv_events import KvEventTracker
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.worker.kv_fanout import KvEventFanout, RelayEnded
from kvmesh.worker.kv_history import KvHistory
from tests.unit.test_kv_event_faults import BS, MODEL, PROMPTS, WORKER, SimWorker

pytestmark = pytest.mark.unit

OPS = st.lists(st.one_of(st.integers(0, len(PROMPTS) - 1), st.just("clear")), max_size=40)


def drive(worker: SimWorker, ops: list[Any]) -> list[common_pb2.KvEventBatch]:
    out = []
    for op in ops:
        batch = worker.clear() if op == "clear" else worker.run(PROMPTS[op])
        if batch is not None:
            out.append(batch)
    return out


def claimed(index: PrefixIndex) -> set[int]:
    return set(index.export().get(WORKER, (np.array([], np.int64),))[0].tolist())


def depths(index: PrefixIndex) -> list[int]:
    return [index.match(prompt_hashes(p, BS, namespace_seed(MODEL)), [WORKER]).get(WORKER, 0)
            for p in PROMPTS]


@settings(max_examples=150, deadline=None)
@given(OPS, OPS)
def test_a_snapshot_gives_a_fresh_router_exactly_what_the_worker_holds(
        before: list[Any], after: list[Any]) -> None:
    worker = SimWorker(capacity=6)
    history = KvHistory()
    for batch in drive(worker, before):
        history.record(batch)
    index = PrefixIndex()
    tracker = KvEventTracker(WORKER, index, MODEL, BS)
    for chunk in history.snapshot(chunk_blocks=2):
        tracker.handle(chunk)
    if history.last is None:
        assert not worker.cache
        return
    # Every prefix the worker can serve from cache is matched as deep as it goes (a
    # block whose parent was evicted first cannot be chained, live or not), and
    # nothing the worker dropped is claimed.
    assert claimed(index) <= set(worker.cache)
    assert depths(index) == [worker.cached_depth(p) for p in PROMPTS]
    # ...and it follows the live batches after it without a reset.
    for batch in drive(worker, after):
        history.record(batch)
        tracker.handle(batch)
    assert tracker.stats.resets == 0
    assert claimed(index) <= set(worker.cache)
    assert all(d <= worker.cached_depth(p) for d, p in zip(depths(index), PROMPTS,
                                                             strict=True))


def test_a_resumed_subscriber_is_replayed_exactly_the_batches_it_missed() -> None:
    worker = SimWorker(capacity=6)
    history = KvHistory(max_batches=4)
    batches = drive(worker, [0, 1, 2, 3, 4, 0, 1])
    for batch in batches:
        history.record(batch)
    last = batches[-1].sequence_number
    assert history.since(last + 1) == []
    assert history.since(last - 1) == batches[-2:]
    assert history.since(last - 3) == batches[-4:]
    assert history.since(last - 4) is None  # rolled out of the history: a snapshot then
    assert history.since(last + 2) is None  # never published
    # The history is bounded by the blocks its batches store too.
    few = KvHistory(max_blocks=5)
    for batch in batches:
        few.record(batch)
    assert few.since(last) == batches[-1:] and few.since(last - 3) is None
    heartbeat = worker.heartbeat()
    history.record(heartbeat)  # heartbeats are no history
    assert history.since(last - 1) == batches[-2:]


def test_copies_and_removals_are_counted_as_vllm_publishes_them() -> None:
    block = common_pb2.KvBlock(block_hash=7, token_ids=[1, 2, 3, 4], block_size=BS)
    store = common_pb2.KvCacheEvent(stored=common_pb2.KvBlocksStored(blocks=[block]))
    remove = common_pb2.KvCacheEvent(removed=common_pb2.KvBlocksRemoved(block_hashes=[7]))
    history = KvHistory()
    history.record(common_pb2.KvEventBatch(sequence_number=5, events=[store, store]))
    assert history.blocks == 2 and history.unknown_before == 4
    history.record(common_pb2.KvEventBatch(sequence_number=6, events=[remove]))
    (chunk,) = history.snapshot(rank=0)
    assert [len(e.stored.blocks) for e in chunk.events] == [1]
    assert (chunk.sequence_number, chunk.dp_rank, chunk.snapshot.count,
            chunk.snapshot.blocks, chunk.snapshot.unknown_before) == (6, 0, 1, 1, 4)
    history.record(common_pb2.KvEventBatch(sequence_number=7, events=[remove]))
    (empty,) = history.snapshot()
    assert not empty.events and empty.snapshot.blocks == 0  # "holds nothing", still said


def test_a_snapshot_is_taken_at_once_and_built_as_it_is_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import kvmesh.worker.kv_history as module

    worker = SimWorker(capacity=6)
    history = KvHistory()
    for batch in drive(worker, [0, 1, 2]):
        history.record(batch)
    expected = list(history.snapshot(chunk_blocks=2))
    assert len(expected) >= 3
    built: list[int] = []

    def counted() -> common_pb2.KvCacheEvent:
        built.append(1)
        return common_pb2.KvCacheEvent()

    monkeypatch.setattr(module, "common_pb2", types.SimpleNamespace(
        KvEventBatch=common_pb2.KvEventBatch, KvBlocksStored=common_pb2.KvBlocksStored,
        KvCacheEvent=counted))
    chunks = history.snapshot(chunk_blocks=2)
    assert not built  # taken: nothing built yet
    first = next(chunks)
    assert len(built) == 2  # one chunk's events, not the whole cache's
    # The record goes on (blocks stored, others evicted) while the stream is written:
    # the rest still describes the moment it was taken.
    for batch in drive(worker, [3, 4, "clear", 0]):
        history.record(batch)
    assert [first, *chunks] == expected


class ScriptedRelay:
    """Stands in for the library's relay: yields what it is given, ends when told."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[common_pb2.KvEventBatch | Exception] = asyncio.Queue()
        self.opened = 0

    async def __call__(self, context: Any) -> AsyncIterator[common_pb2.KvEventBatch]:
        self.opened += 1
        while True:
            try:
                item = await self.queue.get()
            except asyncio.CancelledError:  # as smg's relay: swallowed, the call ends
                return
            if isinstance(item, RelayEnded):
                await context.abort(item.code, item.details)
            assert isinstance(item, common_pb2.KvEventBatch)
            yield item


async def take(stream: AsyncIterator[common_pb2.KvEventBatch], n: int
               ) -> list[common_pb2.KvEventBatch]:
    return [await asyncio.wait_for(anext(stream), 2) for _ in range(n)]


def test_the_fanout_resumes_snapshots_and_ends_subscribers_when_its_relay_fails() -> None:
    async def scenario() -> None:
        worker = SimWorker(capacity=6)
        relay = ScriptedRelay()
        fanout = KvEventFanout(relay)
        fanout.start()
        first = fanout.subscribe(0)
        sent = drive(worker, [0, 1, 2])
        for batch in sent:
            relay.queue.put_nowait(batch)
        assert await take(first, 3) == sent  # live, nothing held before it: no snapshot
        await first.aclose()
        # Two more while nobody listens; a subscriber resuming after the first batch
        # gets exactly the two it missed, then live.
        missed = drive(worker, [3, 4])
        for batch in missed:
            relay.queue.put_nowait(batch)
        await asyncio.sleep(0.05)
        resumed = fanout.subscribe(sent[-1].sequence_number + 1)
        assert await take(resumed, 2) == missed and fanout.resumed == 1
        # A fresh subscriber gets the held blocks as a snapshot numbered with the last.
        fresh = fanout.subscribe(0)
        (snap,) = await take(fresh, 1)
        assert snap.HasField("snapshot") and snap.sequence_number == missed[-1].sequence_number
        assert {e.stored.blocks[0].block_hash for e in snap.events} == set(worker.cache)
        # The relay fails: both end with DATA_LOSS, and it is opened again.
        relay.queue.put_nowait(RelayEnded(grpc.StatusCode.DATA_LOSS, "publisher restarted"))
        for stream in (resumed, fresh):
            with pytest.raises(RelayEnded) as ended:
                await asyncio.wait_for(anext(stream), 2)
            assert ended.value.code == grpc.StatusCode.DATA_LOSS
        for _ in range(40):
            if relay.opened == 2:
                break
            await asyncio.sleep(0.05)
        assert relay.opened == 2 and fanout.history.last is None
        # Closing ends it even though the relay, like the library's, takes the
        # cancellation for the end of its call and returns.
        await asyncio.wait_for(fanout.close(), 2)

    import kvmesh.worker.kv_fanout as module

    restart, module.RESTART_DELAY_S = module.RESTART_DELAY_S, 0.1
    try:
        asyncio.run(scenario())
    finally:
        module.RESTART_DELAY_S = restart
