"""Heartbeats on a KV-event stream before its first batch.

The library's relay (``smg_grpc_servicer.kv_relay``) sends its ``load_only``
heartbeats only after a first batch went out: until the engine stores its first
block, a subscription carries nothing at all. The router cannot tell such a silent
stream from a stalled one, so it drops it after its idle timeout and subscribes again
— and a batch vLLM publishes between the old subscription's close and the new one's
connect is lost (the relay opens a fresh ZMQ SUB socket per subscription and cannot
replay what came before it). That batch is typically the worker's very first: its
blocks never reach the index and every later block's parent is unknown.

When the subscriber asks for ``load_records_before_first_batch``, the worker's
servicer wraps the relay in :func:`with_early_heartbeats`: while the relay has yielded
nothing, a ``load_only`` batch numbered 0 goes out every ``interval_s`` (the router's
sequence check skips a heartbeat numbered 0: nothing was published yet). From the
first batch on, the relay's own heartbeats take over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

from smg_grpc_proto.generated import common_pb2


def early_heartbeat(load: common_pb2.EngineLoad | None) -> common_pb2.KvEventBatch | None:
    """A heartbeat for a stream that has sent no batch yet (None: no load to report)."""
    if load is None:
        return None
    batch = common_pb2.KvEventBatch(sequence_number=0, timestamp=time.time())
    batch.load.CopyFrom(load)
    batch.load.load_only = True
    return batch


async def with_early_heartbeats(
    batches: AsyncGenerator[common_pb2.KvEventBatch, None],
    heartbeat: Callable[[], common_pb2.KvEventBatch | None],
    interval_s: float,
) -> AsyncGenerator[common_pb2.KvEventBatch, None]:
    """``batches`` as they come, with ``heartbeat()`` every ``interval_s`` of silence
    before the first of them. Closing this stream closes ``batches``."""
    first: asyncio.Future[common_pb2.KvEventBatch] = asyncio.ensure_future(anext(batches))
    try:
        while not (await asyncio.wait({first}, timeout=interval_s))[0]:
            beat = heartbeat()
            if beat is not None:
                yield beat
        try:
            yield first.result()
        except StopAsyncIteration:
            return
        async for batch in batches:
            yield batch
    finally:
        if not first.done():
            first.cancel()
            await asyncio.wait({first})  # the relay's own cleanup (its sockets) runs
        await batches.aclose()
