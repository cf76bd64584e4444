"""One relay of the engine's KV events for the worker's life, shared by every
subscriber, with resume and snapshots (``kvmesh.worker.kv_history``).

The library's relay (``smg_grpc_servicer.kv_relay.relay``) is run once, from the
worker's start, through a stand-in for a gRPC context. Each batch it yields is
recorded and handed to every open subscription's queue. A subscription starts:

- at ``start_sequence_number`` when the history still holds every batch from there
  (a stream resumed after a break: the subscriber's view stays as it was);
- otherwise with a snapshot of the blocks held now (a fresh subscriber, a router
  restarted without a snapshot of its own, a cursor the history no longer reaches),
  then live.

A subscriber that falls ``QUEUE_LIMIT`` batches behind is ended with UNAVAILABLE (it
resumes from its cursor). If the relay itself fails (it lost batches it could not
replay, or the publisher restarted), every subscription ends with DATA_LOSS — each
subscriber drops the worker's view and subscribes anew — the record starts over and
marks what it may have missed (``unknown_before``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from smg_grpc_proto.generated import common_pb2

from kvmesh.worker.kv_history import KvHistory

log = logging.getLogger(__name__)

#: Batches a subscription may have waiting before it is ended (it then resumes).
QUEUE_LIMIT = 10_000
#: Seconds before the relay is started again after it failed.
RESTART_DELAY_S = 1.0

#: Opens the library's relay: ``(context) -> async iterator of KvEventBatch``.
OpenRelay = Callable[[Any], AsyncIterator[common_pb2.KvEventBatch]]


class RelayEnded(Exception):
    """The relay aborted its stream (as it would a subscriber's call)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _RelayContext:
    """What the relay asks of a gRPC servicer context, for a call no client made."""

    def __init__(self) -> None:
        self.closed = False

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RelayEnded(code, details)

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None

    def cancelled(self) -> bool:
        return self.closed


class _Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[common_pb2.KvEventBatch | RelayEnded] = asyncio.Queue()


class KvEventFanout:
    """The worker's one relay subscription, its record, and its subscribers."""

    def __init__(self, open_relay: OpenRelay,
                 transform: Callable[[common_pb2.KvEventBatch], None] | None = None,
                 history: KvHistory | None = None) -> None:
        self._open_relay = open_relay
        self._transform = transform
        self.history = history or KvHistory()
        self._subscriptions: set[_Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._context: _RelayContext | None = None
        #: Subscriptions served from the history / from a snapshot (tests, logs).
        self.resumed = 0
        self.snapshots = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closed = True
        if self._context is not None:
            self._context.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._closed:
            self._context = context = _RelayContext()
            try:
                async for batch in self._open_relay(context):
                    self._publish(batch)
                ended = RelayEnded(grpc.StatusCode.UNAVAILABLE, "the KV event relay ended")
            except RelayEnded as exc:
                ended = exc
            except Exception as exc:  # noqa: BLE001 - a relay bug must not end the worker's
                log.exception("KV event relay failed")
                ended = RelayEnded(grpc.StatusCode.DATA_LOSS, f"KV event relay failed: {exc}")
            if self._closed:  # the relay takes a cancellation for the end of its call
                return
            log.warning("KV event relay ended (%s); subscribers resubscribe, restarting in "
                        "%.0f s", ended, RESTART_DELAY_S)
            # What the record holds may now miss batches: subscribers rebuild.
            lost = RelayEnded(grpc.StatusCode.DATA_LOSS, f"the worker's KV event relay "
                              f"ended ({ended}); resubscribe from zero")
            for sub in list(self._subscriptions):
                sub.queue.put_nowait(lost)
            self._subscriptions.clear()
            seen = self.history.last
            self.history = KvHistory(self.history.max_batches, self.history.max_blocks)
            self.history.unknown_before = (seen or 0) + 1
            await asyncio.sleep(RESTART_DELAY_S)

    def _publish(self, batch: common_pb2.KvEventBatch) -> None:
        if self._transform is not None:
            self._transform(batch)
        self.history.record(batch)
        for sub in list(self._subscriptions):
            if sub.queue.qsize() >= QUEUE_LIMIT:
                self._subscriptions.discard(sub)
                sub.queue.put_nowait(RelayEnded(
                    grpc.StatusCode.UNAVAILABLE,
                    f"subscriber {QUEUE_LIMIT} KV event batches behind; resume from its cursor"))
            else:
                sub.queue.put_nowait(batch)

    def subscribe(self, start: int) -> AsyncGenerator[common_pb2.KvEventBatch, None]:
        """Join now: the batches a subscription from ``start`` gets, history or
        snapshot, then live. The stream raises ``RelayEnded`` when it must end with
        that status."""
        self.start()
        sub = _Subscription()
        # Nothing runs between reading the record and joining: no batch falls between.
        replay = self.history.since(start) if start else None
        first: Iterable[common_pb2.KvEventBatch]
        if replay is not None:
            self.resumed += 1
            first = replay
        else:
            # Taken now, built chunk by chunk as the stream is written.
            first = self.history.snapshot()
            self.snapshots += self.history.last is not None
        self._subscriptions.add(sub)
        return self._stream(sub, first)

    async def _stream(self, sub: _Subscription, first: Iterable[common_pb2.KvEventBatch]
                      ) -> AsyncGenerator[common_pb2.KvEventBatch, None]:
        try:
            for batch in first:
                yield batch
            while True:
                item = await sub.queue.get()
                if isinstance(item, RelayEnded):
                    raise item
                yield item
        finally:
            self._subscriptions.discard(sub)
