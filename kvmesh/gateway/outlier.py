"""Per-worker circuit breaking, as Envoy's outlier detection does it (pure, no grpc).

Every call the gateway makes to a worker ends as a success or a failure (the caller
decides which status codes are the worker's fault). ``consecutive_failures`` failures
in a row eject the worker for ``base_ejection_s`` × the number of times it has been
ejected, capped at ``max_ejection_s``; while ejected, routing avoids it. When the
ejection ends the worker is routable again and its next call is a trial (a circuit
breaker's half-open state; Envoy instead waits for another run of failures): a failure
ejects it again at once, for longer; a success closes the circuit. A worker's
ejection count decays by one for each ejection period it stays healthy, so a worker
that failed once last week does not start at the maximum.

``max_ejection_percent`` of the known workers may be ejected at once (always at least
one): a fault of the whole mesh (the gateway's own network) must not empty the pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmesh.core.resilience_config import OutlierConfig


@dataclass
class _Host:
    failures: int = 0  # consecutive
    ejections: int = 0  # how many times ejected (decays while healthy)
    ejected_until: float = 0.0
    healthy_since: float = 0.0
    on_trial: bool = False  # back from an ejection, no success yet


class OutlierDetector:
    def __init__(self, config: OutlierConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = self._config = config
        self._clock = clock
        self._hosts: dict[str, _Host] = {}
        #: Ejections so far (for the metric).
        self.ejections_total = 0

    def success(self, worker_id: str) -> None:
        host = self._hosts.get(worker_id)
        if host is None:
            return
        host.failures = 0
        host.on_trial = False
        now = self._clock()
        # Healthy for a whole (base) ejection period since the last one: one less.
        if host.ejections and now - host.healthy_since >= self._config.base_ejection_s:
            host.ejections -= 1
            host.healthy_since = now
        if not host.ejections and now >= host.ejected_until:
            del self._hosts[worker_id]

    def failure(self, worker_id: str, known_workers: int) -> bool:
        """Count a failure; True when it ejected the worker just now."""
        threshold = self._config.consecutive_failures
        if threshold <= 0:
            return False
        host = self._hosts.setdefault(worker_id, _Host())
        host.failures += 1
        now = self._clock()
        if now < host.ejected_until or (host.failures < threshold and not host.on_trial):
            return False
        if not self._may_eject(known_workers, now):
            return False
        host.ejections += 1
        host.failures = 0
        host.on_trial = True
        length = min(self._config.base_ejection_s * host.ejections,
                     self._config.max_ejection_s)
        host.ejected_until = now + length
        host.healthy_since = host.ejected_until
        self.ejections_total += 1
        return True

    def _may_eject(self, known_workers: int, now: float) -> bool:
        ejected = sum(1 for h in self._hosts.values() if now < h.ejected_until)
        allowed = max(1, known_workers * self._config.max_ejection_percent // 100)
        return ejected < allowed

    def ejected(self) -> list[str]:
        """The workers ejected right now (routing avoids them)."""
        now = self._clock()
        return sorted(w for w, h in self._hosts.items() if now < h.ejected_until)

    def ejection_s(self, worker_id: str) -> float:
        """Seconds left of the worker's ejection (0 when it is not ejected)."""
        host = self._hosts.get(worker_id)
        return max(0.0, host.ejected_until - self._clock()) if host else 0.0
