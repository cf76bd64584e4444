"""Routing policies behind one interface.

A policy sees the candidate workers for a request (already filtered by model,
adapter and role) and picks one. The KV-aware policy plugs in here too: it gets the
prompt's token ids through :class:`RouteContext`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvmesh.errors import NoWorkerAvailableError
from kvmesh.router.registry import WorkerState


@dataclass(frozen=True)
class RouteContext:
    """What a policy may look at besides the workers."""

    request_id: str
    model: str
    adapter: str = ""
    token_ids: Sequence[int] = field(default_factory=tuple)
    max_tokens: int = 0


@dataclass(frozen=True)
class Choice:
    worker: WorkerState
    reason: str
    expected_cached_tokens: int = 0


class Policy(Protocol):
    name: str

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        """Pick one of ``workers`` (never empty) for the request."""
        ...


class RandomPolicy:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        return Choice(self._rng.choice(list(workers)), "random")


class RoundRobinPolicy:
    """Cycles through the candidates of each model in worker-id order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        key = f"{ctx.model}\x00{ctx.adapter}"
        index = self._next.get(key, 0)
        self._next[key] = index + 1
        return Choice(workers[index % len(workers)], "round_robin")


class PowerOfTwoPolicy:
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


POLICY_NAMES = ("random", "round_robin", "power_of_two")


def make_policy(name: str, seed: int | None = None) -> Policy:
    rng = random.Random(seed)
    if name == "random":
        return RandomPolicy(rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def pick(policy: Policy, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
    """Apply ``policy``, with the one error every caller needs for an empty pool."""
    if not workers:
        raise NoWorkerAvailableError(
            f"no live worker serves model {ctx.model!r}"
            + (f" with adapter {ctx.adapter!r}" if ctx.adapter else "")
        )
    return policy.choose(ctx, workers)
