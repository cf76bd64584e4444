"""`random`: a uniformly random candidate (the floor every other policy must beat)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvmesh.router.policy.base import Choice, LoadOnly, RouteContext
from kvmesh.router.registry import WorkerState


class RandomPolicy(LoadOnly):
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        return Choice(self._rng.choice(list(workers)), "random")
