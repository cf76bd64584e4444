"""`round_robin`: each (model, adapter) cycles through its candidates."""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.router.policy.base import Choice, LoadOnly, RouteContext
from kvmesh.router.registry import WorkerState


class RoundRobinPolicy(LoadOnly):
    """Cycles through the candidates of each model in worker-id order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        key = f"{ctx.model}\x00{ctx.adapter}"
        index = self._next.get(key, 0)
        self._next[key] = index + 1
        return Choice(workers[index % len(workers)], "round_robin")
