"""A restarted router routes only once it knows its workers again (pure).

A router that restarts from a snapshot knows which workers it had. Until they have
registered again (each re-registers within one heartbeat interval of reaching it, when
its heartbeat is answered "unknown"; its channel retries a router that was down at
least every ``core.grpc_util.RECONNECT_BACKOFF_MAX_S``), its worker set is partial: a
Route would say "model not found" and a WatchWorkers subscriber would be told workers
vanished. So while warming up the router refuses Route as *unavailable* (a gateway then
asks another replica, or routes on its own) and holds WatchWorkers; warm-up ends when
every snapshotted worker is back or after ``max_s`` (a worker that died meanwhile never
comes back). A router without a snapshot (or one listing no workers) cannot tell a
restart from a first start: for its first ``max_s`` it is *young*: until some worker
registers it refuses Route as unavailable and holds WatchWorkers, rather than tell a
gateway that the model does not exist or that every worker vanished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class Warmup:
    def __init__(self, max_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._max_s = max_s
        self._born = clock()
        self._until = 0.0
        self._expected: frozenset[str] = frozenset()

    def expect(self, worker_ids: Iterable[str]) -> None:
        """The snapshot's workers: wait for them, at most ``max_s`` from now."""
        self._expected = frozenset(worker_ids)
        self._until = self._clock() + self._max_s if self._expected else 0.0

    def young(self) -> bool:
        """Within ``max_s`` of start: every live worker has not heartbeated yet."""
        return self._clock() - self._born < self._max_s

    def missing(self, registered: Iterable[str]) -> list[str]:
        """The workers still awaited (empty: warm)."""
        if not self._expected or self._clock() >= self._until:
            self._expected = frozenset()
            return []
        missing = sorted(self._expected - set(registered))
        if not missing:
            self._expected = frozenset()
        return missing
