"""`power_of_two`: the less loaded of two random candidates (the fallback policy)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvmesh.router.policy.base import Choice, LoadOnly, RouteContext
from kvmesh.router.registry import WorkerState


class PowerOfTwoPolicy(LoadOnly):
    """Samples two candidates and takes the less loaded (ties: the first sampled)."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        if len(workers) == 1:
            return Choice(workers[0], "power_of_two:only_candidate")
        a, b = self._rng.sample(list(workers), 2)
        if b.active < a.active or (b.active == a.active and b.load.kv_usage < a.load.kv_usage):
            return Choice(b, "power_of_two:less_loaded")
        return Choice(a, "power_of_two:less_loaded")
