"""What every routing policy is: the context it decides on, its choice, its hooks.

Callers (the router core, the P/D decision, the simulator) use only this protocol:
``cached_tokens`` is empty for a policy that knows nothing of caches, ``finished`` is a
no-op for one that keeps no per-request state, so nobody tests a policy's type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvmesh.core.errors import NoWorkerAvailableError
from kvmesh.router.block_hash import TokenIds
from kvmesh.router.registry import WorkerState


@dataclass(frozen=True)
class RouteContext:
    """What a policy may look at besides the workers."""

    request_id: str
    model: str
    adapter: str = ""
    token_ids: TokenIds = field(default_factory=tuple)
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

    def cached_tokens(self, ctx: RouteContext, workers: Sequence[WorkerState]
                      ) -> dict[str, int]:
        """Prompt tokens each worker already holds, without side effects (empty when
        the policy keeps no cache view): what the P/D decision prices."""
        ...

    def finished(self, request_id: str) -> None:
        """The request ended (finished, failed or cancelled): drop what the policy
        keeps for it."""
        ...


class LoadOnly:
    """The hooks of a policy that routes by load alone: no cache view, no state."""

    def cached_tokens(self, ctx: RouteContext, workers: Sequence[WorkerState]
                      ) -> dict[str, int]:
        return {}

    def finished(self, request_id: str) -> None:
        return None


def pick(policy: Policy, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
    """Apply ``policy``, with the one error every caller needs for an empty pool."""
    if not workers:
        raise NoWorkerAvailableError(
            f"no live worker serves model {ctx.model!r}"
            + (f" with adapter {ctx.adapter!r}" if ctx.adapter else "")
        )
    return policy.choose(ctx, workers)
