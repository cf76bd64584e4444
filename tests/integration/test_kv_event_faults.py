"""The router's KV-event follower over real gRPC against a scripted publisher: a lost
tail is caught by the next heartbeat, a restarted worker (new incarnation) by the
incarnation check when the stream is resumed, and a refused resume (OUT_OF_RANGE, what
vLLM's servicer answers to a non-zero start) drops the view. Each prints how long the
index claimed blocks the worker no longer had (the repair window)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2

from kvmesh.core.grpc_util import internal_channel
from kvmesh.router import worker_probe
from kvmesh.router.kv_events import KvEventFollower
from kvmesh.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.integration
BS = 4
HEARTBEAT_S = 1.0
IDLE_S = 2.0  # vLLM's servicer: smg_grpc_servicer.load_record.HEARTBEAT_INTERVAL


def stored(seq: int, base: int) -> common_pb2.KvEventBatch:
    blocks = [common_pb2.KvBlock(block_hash=base + i, token_ids=list(range(
        base + i * BS, base + (i + 1) * BS)), block_size=BS) for i in range(1)]
    return common_pb2.KvEventBatch(sequence_number=seq, events=[common_pb2.KvCacheEvent(
        stored=common_pb2.KvBlocksStored(blocks=blocks))])


def heartbeat(seq: int) -> common_pb2.KvEventBatch:
    return common_pb2.KvEventBatch(sequence_number=seq,
                                   load=common_pb2.EngineLoad(load_only=True))


class ScriptedPublisher(vllm_engine_pb2_grpc.VllmEngineServicer):
    """Serves one scripted subscription at a time; records the starts it was asked."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.script: asyncio.Queue[common_pb2.KvEventBatch | grpc.StatusCode | None] = \
            asyncio.Queue()
        self.starts: list[int] = []
        self.refuse_resume = False
        #: The follower's on_break calls (a stream lost on UNAVAILABLE).
        self.breaks = 0

    async def GetServerInfo(self, request: vllm_engine_pb2.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> vllm_engine_pb2.GetServerInfoResponse:
        return vllm_engine_pb2.GetServerInfoResponse(
            uptime_seconds=time.time() - self.started_at, block_size=BS)

    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest,
                                context: grpc.aio.ServicerContext,
                                ) -> AsyncIterator[common_pb2.KvEventBatch]:
        self.starts.append(request.start_sequence_number)
        if self.refuse_resume and request.start_sequence_number:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "no history to resume from")
        while True:
            item = await self.script.get()
            if item is None:
                return
            if isinstance(item, grpc.StatusCode):
                await context.abort(item, "scripted break")
            yield item


async def _until(predicate: object, timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, "not repaired in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def publisher(request: pytest.FixtureRequest,
                    ) -> AsyncIterator[tuple[ScriptedPublisher, KvEventFollower, PrefixIndex]]:
    retry_s = getattr(request, "param", 0.1)  # the pause after a broken stream
    server = grpc.aio.server()
    scripted = ScriptedPublisher()
    vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(scripted, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = internal_channel(f"127.0.0.1:{port}")
    index = PrefixIndex()
    follower = KvEventFollower(
        "w0", channel, index, "m", BS, retry_s=retry_s, idle_timeout_s=IDLE_S,
        on_break=lambda: setattr(scripted, "breaks", scripted.breaks + 1),
        incarnation=await worker_probe.incarnation(vllm_engine_pb2_grpc.VllmEngineStub(channel)),
        probe_incarnation=lambda: worker_probe.incarnation(
            vllm_engine_pb2_grpc.VllmEngineStub(channel)))
    task = asyncio.create_task(follower.run())
    try:
        yield scripted, follower, index
    finally:
        task.cancel()
        await channel.close()
        await server.stop(None)


async def test_lost_tail_is_repaired_by_the_next_heartbeat(
        publisher: tuple[ScriptedPublisher, KvEventFollower, PrefixIndex]) -> None:
    scripted, follower, index = publisher
    for seq in range(3):
        await scripted.script.put(stored(seq, 100 * (seq + 1)))
    await _until(lambda: index.blocks("w0") == 3, 5)
    # Batch 3 (which, say, removed everything) is lost; the heartbeat a second later
    # repeats its number.
    lost_at = time.monotonic()
    await asyncio.sleep(HEARTBEAT_S)
    await scripted.script.put(heartbeat(3))
    await _until(lambda: index.blocks("w0") == 0, 5)
    window = time.monotonic() - lost_at
    print(f"\nlost tail: stale claims for {window:.2f} s (heartbeat every {HEARTBEAT_S} s)")
    assert follower.stats.gaps == 1 and window < HEARTBEAT_S + 0.5
    # Duplicates are skipped, the next batch applies.
    await scripted.script.put(heartbeat(3))
    await scripted.script.put(stored(4, 900))
    await _until(lambda: index.blocks("w0") == 1, 5)
    assert follower.stats.resets == 1


async def test_restart_with_a_new_incarnation_drops_the_view(
        publisher: tuple[ScriptedPublisher, KvEventFollower, PrefixIndex]) -> None:
    scripted, follower, index = publisher
    await scripted.script.put(stored(0, 100))
    await scripted.script.put(stored(1, 200))
    await _until(lambda: index.blocks("w0") == 2, 5)
    # Same worker, stream broken: resumed after the cursor, view kept.
    await scripted.script.put(grpc.StatusCode.UNAVAILABLE)
    await _until(lambda: scripted.starts == [0, 2], 5)
    assert index.blocks("w0") == 2 and follower.stats.resets == 0
    # The worker restarts: empty cache, a new start time, numbering from 0.
    broke = time.monotonic()
    scripted.started_at += 30.0  # incarnations within 5 s read as the same start
    await scripted.script.put(grpc.StatusCode.UNAVAILABLE)
    window = await _until(lambda: index.blocks("w0") == 0, 5)
    print(f"\nrestart: stale claims for {window:.2f} s after the stream broke "
          f"({time.monotonic() - broke:.2f} s)")
    await _until(lambda: scripted.starts[-1:] == [0], 5)
    await scripted.script.put(stored(0, 500))
    await _until(lambda: index.blocks("w0") == 1, 5)
    assert follower.stats.resets == 1


async def test_refused_resume_drops_the_view(
        publisher: tuple[ScriptedPublisher, KvEventFollower, PrefixIndex]) -> None:
    scripted, follower, index = publisher
    scripted.refuse_resume = True
    await scripted.script.put(stored(0, 100))
    await _until(lambda: index.blocks("w0") == 1, 5)
    await scripted.script.put(grpc.StatusCode.UNAVAILABLE)
    await _until(lambda: index.blocks("w0") == 0, 5)
    await _until(lambda: scripted.starts[-2:] == [1, 0], 5)
    assert follower.stats.resets == 1


async def test_a_silent_stream_is_dropped_and_resumed(
        publisher: tuple[ScriptedPublisher, KvEventFollower, PrefixIndex],
        caplog: pytest.LogCaptureFixture) -> None:
    scripted, follower, index = publisher
    await scripted.script.put(stored(0, 100))
    await _until(lambda: index.blocks("w0") == 1, 5)
    # No batch, no heartbeat: the subscription is given up after IDLE_S and resumed.
    with caplog.at_level(logging.DEBUG, logger="kvmesh.router.kv_events"):
        waited = await _until(lambda: scripted.starts == [0, 1], IDLE_S + 3)
    print(f"\nsilent stream resubscribed after {waited:.2f} s (idle timeout {IDLE_S} s)")
    assert waited >= IDLE_S - 0.5 and index.blocks("w0") == 1
    assert [r.levelno for r in caplog.records if "silent" in r.message] == [logging.WARNING]


@pytest.mark.parametrize("publisher", [30.0], indirect=True)
async def test_a_stream_that_never_brought_a_batch_is_resumed_quietly(
        publisher: tuple[ScriptedPublisher, KvEventFollower, PrefixIndex],
        caplog: pytest.LogCaptureFixture) -> None:
    """An idle worker's relay (not a kvmesh worker's) sends no heartbeat before its
    first batch: its stream is resumed at the idle timeout as any silent one, but that
    is no stall to warn of, and the new subscription opens at once, not after the
    pause that follows a broken stream (here 30 s): a batch published between the two
    would be lost."""
    scripted, _, _ = publisher
    with caplog.at_level(logging.DEBUG, logger="kvmesh.router.kv_events"):
        await _until(lambda: scripted.starts == [0, 0], IDLE_S + 3)
    assert [r.levelno for r in caplog.records if "silent" in r.message] == [logging.DEBUG]


async def test_a_stream_lost_on_unavailable_is_reported_at_once(
        publisher: tuple[ScriptedPublisher, KvEventFollower, PrefixIndex]) -> None:
    """``streaming`` is what lets the router skip polling a worker (its stream proves
    it alive); a stream that breaks on a lost connection calls ``on_break`` (the router
    probes the worker at once), another failure does not."""
    scripted, follower, index = publisher
    assert not follower.streaming
    await scripted.script.put(stored(0, 100))
    await _until(lambda: follower.streaming and index.blocks("w0") == 1, 5)
    await scripted.script.put(grpc.StatusCode.INTERNAL)
    await _until(lambda: len(scripted.starts) == 2, 5)
    assert scripted.breaks == 0
    await scripted.script.put(heartbeat(1))
    await _until(lambda: follower.streaming, 5)
    await scripted.script.put(grpc.StatusCode.UNAVAILABLE)
    await _until(lambda: scripted.breaks == 1, 5)
    assert not follower.streaming
