"""Admission: at most N requests in flight per worker; the rest wait at the router.

When every candidate worker is full, a Route call waits here instead of being sent
on, and is placed when a slot frees, among the workers that have one. Waiters are
woken in arrival order whenever a slot may have freed (a request finished, a load
report, a worker joined). One queue per model (the router keeps a map), so a model
whose workers are full never holds up another's. Pure asyncio: no grpc, ray or vllm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class AdmissionTimeout(Exception):
    """No worker slot freed within the wait allowed."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no worker slot freed in {waited_s:.1f}s")
        self.waited_s = waited_s


class AdmissionDeferred(Exception):
    """The request would wait for a slot and its caller asked not to (a RouteBatch
    with ``defer_waits``: it asks again on a call of its own)."""


class Admission:
    """FIFO wait for a free slot; ``limit`` 0 admits everything at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiters: list[asyncio.Event] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def free(self, candidates: Sequence[T], in_flight: Callable[[T], int]) -> list[T]:
        """The candidates with a free slot (all of them when there is no limit)."""
        if self.limit <= 0:
            return list(candidates)
        return [c for c in candidates if in_flight(c) < self.limit]

    async def admit(
        self, candidates: Callable[[], Sequence[T]], in_flight: Callable[[T], int],
        max_wait_s: float, defer: bool = False,
    ) -> list[T]:
        """The candidates with a free slot, waiting up to ``max_wait_s`` for one.

        ``candidates`` is re-read at every wake-up (workers come and go). Requests
        already waiting go first: a newcomer waits behind them even if a slot is
        free, so a steady stream of arrivals cannot starve an earlier request.
        Raises :class:`AdmissionTimeout` when no slot frees in time, and
        :class:`AdmissionDeferred` instead of waiting at all with ``defer``; an empty
        candidate list is returned as is (the caller reports "no worker").
        """
        pool = candidates()
        ready = self.free(pool, in_flight)
        if not pool or (ready and not self._waiters):
            return ready
        if defer:
            raise AdmissionDeferred
        event = asyncio.Event()
        self._waiters.append(event)
        started = time.monotonic()
        try:
            while True:
                remaining = max_wait_s - (time.monotonic() - started)
                try:
                    await asyncio.wait_for(event.wait(), max(remaining, 0.0))
                except TimeoutError:
                    raise AdmissionTimeout(time.monotonic() - started) from None
                event.clear()
                pool = candidates()
                ready = self.free(pool, in_flight)
                if not pool or (ready and self._waiters[0] is event):
                    return ready
        finally:
            self._waiters.remove(event)
            self.notify()  # the next in line may be admissible now

    def notify(self) -> None:
        """A slot may have freed: the first waiter looks again (it wakes the next one
        when it leaves, so a burst of freed slots drains the queue in order)."""
        if self._waiters:
            self._waiters[0].set()

