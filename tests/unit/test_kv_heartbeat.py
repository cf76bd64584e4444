"""Heartbeats before a KV-event stream's first batch (kvmesh.worker.kv_heartbeat), and
how the router's sequence check reads them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from smg_grpc_proto.generated import common_pb2

from kvmesh.router.kv_sequence import SequenceCursors
from kvmesh.worker.kv_heartbeat import early_heartbeat, with_early_heartbeats


def _batch(seq: int) -> common_pb2.KvEventBatch:
    batch = common_pb2.KvEventBatch(sequence_number=seq)
    batch.events.add().stored.blocks.add(block_hash=seq + 1, token_ids=[1, 2])
    return batch


class Relay:
    """A relay that is silent for ``silence_s`` and then sends two batches."""

    def __init__(self, silence_s: float) -> None:
        self.silence_s = silence_s
        self.closed = False
        self.cancelled = False

    async def stream(self) -> AsyncGenerator[common_pb2.KvEventBatch, None]:
        try:
            await asyncio.sleep(self.silence_s)
            yield _batch(0)
            yield _batch(1)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed = True


def _load() -> common_pb2.EngineLoad:
    return common_pb2.EngineLoad(running_requests=0, max_running_requests=8)


def test_a_silent_relay_is_preceded_by_heartbeats_numbered_zero() -> None:
    async def run() -> list[common_pb2.KvEventBatch]:
        relay = Relay(0.55)
        out = [b async for b in with_early_heartbeats(
            relay.stream(), lambda: early_heartbeat(_load()), 0.1)]
        assert relay.closed
        return out

    out = asyncio.run(run())
    beats, batches = out[:-2], out[-2:]
    assert 4 <= len(beats) <= 6
    assert all(b.sequence_number == 0 and b.load.load_only and not b.events for b in beats)
    assert [b.sequence_number for b in batches] == [0, 1]
    assert not any(b.HasField("load") for b in batches)


def test_no_heartbeat_once_the_first_batch_went_out_or_without_a_load() -> None:
    async def run(silence_s: float, load: common_pb2.EngineLoad | None) -> list[int]:
        relay = Relay(silence_s)
        return [int(b.load.load_only) async for b in with_early_heartbeats(
            relay.stream(), lambda: early_heartbeat(load), 0.1)]

    assert asyncio.run(run(0.0, _load())) == [0, 0]
    assert asyncio.run(run(0.35, None)) == [0, 0]


def test_closing_the_stream_while_silent_cancels_and_closes_the_relay() -> None:
    async def run() -> Relay:
        relay = Relay(60)
        stream = with_early_heartbeats(relay.stream(), lambda: early_heartbeat(_load()), 0.05)
        assert (await anext(stream)).load.load_only
        await stream.aclose()
        return relay

    relay = asyncio.run(run())
    assert relay.cancelled and relay.closed


def test_the_router_skips_early_heartbeats_and_applies_batch_zero() -> None:
    cursors = SequenceCursors()
    beat = early_heartbeat(_load())
    assert beat is not None
    for _ in range(3):
        verdict = cursors.admit(0, beat.sequence_number, load_only=True)
        assert not verdict.apply and verdict.reset is None
    assert cursors.admit(0, 0).apply  # the publisher's first batch is not a duplicate
    assert cursors.admit(0, 1).apply
