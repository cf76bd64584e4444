"""How many workers each pool should have (pure: no clock, no grpc).

A pool is one model's workers of one role. Every tick the router hands each pool's
``PoolScaler`` the load it tracks (running and waiting requests, queued prefill tokens,
KV usage) and gets back the desired worker count, which it exports
(``kvmesh_router_desired_workers``, ListWorkers' pools) for whatever runs the workers —
``kvmesh up``'s scaler on Ray, or a Kubernetes HPA/KEDA — to follow.

The need (workers the load calls for) is the largest of the three load ratios. The
desired count goes up to the need's mean over a short window, down one worker at a
time only when the need's peak over a long window fits in fewer, each after its
cooldown, and not while need/current is within the tolerance.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from kvmesh.core.autoscale_config import AutoscaleConfig


@dataclass(frozen=True)
class PoolLoad:
    """One pool's load at one moment."""

    workers: int
    #: Requests running or waiting on the pool's workers (the router's count when larger).
    requests: float
    #: Prompt tokens waiting for prefill (reported, plus routed since the last report).
    queued_prefill_tokens: float
    #: The workers' KV-cache usage, summed (each in [0, 1]).
    kv_usage: float


def need(config: AutoscaleConfig, load: PoolLoad) -> float:
    """Workers this load calls for (fractional)."""
    return max(load.requests / config.target_requests_per_worker,
               load.queued_prefill_tokens / config.target_queued_prefill_tokens_per_worker,
               load.kv_usage / config.target_kv_usage)


class PoolScaler:
    """The desired worker count of one pool, from the loads it is shown over time."""

    def __init__(self, config: AutoscaleConfig, model: str, role: str) -> None:
        self.config = config
        self.model, self.role = model, role
        self.bounds = config.bounds(model, role)
        self.desired: int | None = None
        self.need = 0.0
        self._samples: deque[tuple[float, float]] = deque()
        self._first_at: float | None = None
        self._changed_at = -math.inf

    def _window(self, now: float, seconds: float) -> Iterable[float]:
        return (n for t, n in self._samples if now - t <= seconds)

    def observe(self, load: PoolLoad, now: float) -> int:
        """Take this load at time ``now`` (seconds, monotonic); the desired count."""
        cfg = self.config
        self.need = need(cfg, load)
        self._samples.append((now, self.need))
        if self._first_at is None:
            self._first_at = now
        horizon = max(cfg.scale_up_window_s, cfg.scale_down_window_s)
        while self._samples and now - self._samples[0][0] > horizon:
            self._samples.popleft()

        lo, hi = self.bounds
        # The reference is what was asked for, not what runs: a worker takes minutes
        # to start, and asking again meanwhile would overshoot.
        current = load.workers if self.desired is None else self.desired
        target = min(max(current, lo), hi)
        if target == current:
            since = now - self._changed_at
            up = list(self._window(now, cfg.scale_up_window_s))
            up_need = sum(up) / len(up)
            down_need = max(self._window(now, cfg.scale_down_window_s))
            if (up_need > current * (1 + cfg.tolerance) and since >= cfg.scale_up_cooldown_s):
                target = min(hi, math.ceil(up_need))
            elif (math.ceil(down_need * (1 + cfg.tolerance)) < current
                  and since >= cfg.scale_down_cooldown_s
                  and now - self._first_at >= cfg.scale_down_window_s):
                target = max(lo, current - 1)
        if target != current:
            self._changed_at = now
        self.desired = target
        return target
