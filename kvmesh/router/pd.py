"""Aggregated or disaggregated, per request (pure).

Pools: ``both`` workers run whole requests; ``prefill`` workers only prefill and hand
the KV to a ``decode`` worker; a decode worker that gets no KV prefills locally, so it
can also take a whole request. For each request the one cost model prices

    aggregated     best whole-request worker: its time to first token (its cache, its
                   queue) + the stall its prefill inflicts on the sequences it decodes
    disaggregated  best prefill worker (prefix-affine: the policy's cache view) + the
                   KV transfer + admission on the least-loaded compatible decode worker

and the cheaper wins. Long uncached prompts on busy decoders disaggregate; short or
cached prompts stay where they are (the transfer costs more than it saves).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvmesh.core.config import CostParams
from kvmesh.core.errors import NoWorkerAvailableError
from kvmesh.router.cost_model import aggregated_cost, disaggregated_cost, load_input
from kvmesh.router.policy.base import Policy, RouteContext, pick
from kvmesh.router.registry import WorkerState

DisaggregationMode = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class PdDecision:
    """``worker`` decodes (and prefills, when ``prefill_worker`` is None)."""

    worker: WorkerState
    prefill_worker: WorkerState | None
    reason: str
    expected_cached_tokens: int = 0

    @property
    def disaggregated(self) -> bool:
        return self.prefill_worker is not None


def compatible(prefill: WorkerState, decode: WorkerState) -> bool:
    """A pair that can hand KV over: same connector, same block size when known."""
    return (
        bool(prefill.kv_connector)
        and prefill.kv_connector == decode.kv_connector
        and (not prefill.block_size or not decode.block_size
             or prefill.block_size == decode.block_size)
    )


def least_loaded(workers: Sequence[WorkerState], rng: random.Random) -> WorkerState:
    """Decode choice: fewest active sequences, then emptiest KV cache; ties random."""
    def key(w: WorkerState) -> tuple[int, float]:
        return (w.active, round(w.load.kv_usage, 2))

    best = min(key(w) for w in workers)
    return rng.choice([w for w in workers if key(w) == best])


def decide(
    policy: Policy,
    ctx: RouteContext,
    whole: Sequence[WorkerState],
    prefill: Sequence[WorkerState],
    decode: Sequence[WorkerState],
    mode: DisaggregationMode,
    params: CostParams,
    rng: random.Random,
) -> PdDecision:
    """Pick the mode and the worker(s) for one request.

    ``whole``: workers that can run the request start to end (both + decode roles);
    ``prefill``/``decode``: the P and D pools (decode workers appear in both lists).
    """
    pairable = [p for p in prefill if any(compatible(p, d) for d in decode)]
    if mode == "never" or not pairable:
        choice = pick(policy, ctx, whole or prefill)  # empty: the one "no worker" error
        return PdDecision(choice.worker, None, choice.reason, choice.expected_cached_tokens)
    if mode == "auto" and whole:
        agg_cost, dis_cost = _costs(policy, ctx, whole, pairable, decode, params, rng)
        if agg_cost <= dis_cost:
            choice = pick(policy, ctx, whole)
            return PdDecision(choice.worker, None, f"pd:aggregated:{choice.reason}",
                              choice.expected_cached_tokens)
    p_choice = pick(policy, ctx, pairable)
    partners = [d for d in decode if compatible(p_choice.worker, d)]
    if not partners:  # pairable guarantees one; kept for a clear error
        raise NoWorkerAvailableError(f"no decode worker pairs with {p_choice.worker.worker_id}")
    d = least_loaded(partners, rng)
    return PdDecision(d, p_choice.worker, f"pd:disaggregated:{p_choice.reason}",
                      p_choice.expected_cached_tokens)


def _costs(
    policy: Policy,
    ctx: RouteContext,
    whole: Sequence[WorkerState],
    prefill: Sequence[WorkerState],
    decode: Sequence[WorkerState],
    params: CostParams,
    rng: random.Random,
) -> tuple[float, float]:
    """Best aggregated and best disaggregated cost (seconds) for the request."""
    cached = policy.cached_tokens(ctx, [*whole, *prefill])
    n = len(ctx.token_ids)
    adapter, tokens = ctx.adapter, params.adapter_load_tokens
    agg = min(aggregated_cost(params, load_input(w, adapter, tokens), n,
                              cached.get(w.worker_id, 0))
              for w in whole)
    dis = min(
        disaggregated_cost(
            params, load_input(p, adapter, tokens),
            load_input(least_loaded([d for d in decode if compatible(p, d)], rng)),
            n, cached.get(p.worker_id, 0))
        for p in prefill
    )
    return agg, dis
