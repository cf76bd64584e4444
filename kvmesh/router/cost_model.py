"""The one cost model: estimated seconds until a request's first token (pure).

    cost(w) = (uncached prompt tokens on w + prefill work queued on w
               + adapter load tokens, when the request's LoRA adapter is not loaded on w)
              / prefill rate
              + backlog weight × requests waiting on w × uncached tokens / prefill rate
              + eviction weight × KV fullness of w × uncached tokens / prefill rate
              + running sequences on w × per-sequence step cost

The backlog term prices a miss for the requests it delays: on a worker with a queue,
about as many requests will wait behind this prefill as wait there now (Little's law),
so its uncached tokens cost their prefill time once more per waiting request. An idle
fleet spreads freely; a saturated one stops trading cache hits for a shorter queue,
because there every miss is capacity lost.

An adapter load is priced as prefill work queued in front of the request
(``adapter_load_tokens``, its load time in prefill tokens): requests for an adapter
stay on the workers holding it while that beats loading it elsewhere, and spread once
the holders' queues cost more than a load.

The parameters are ``CostParams`` (``RouterConfig.cost``, so a deployment sets them
in its router config). Cached tokens come from the prefix index (confirmed or
pending blocks), queued work from the worker's own report plus what the router routed
since that report, and the decode pressure from the worker's running set. Bounded
load keeps any worker from taking more than (1 + ε) × the mean active load (+1), so
affinity never piles everything onto one cache.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmesh.core.config import CostParams
from kvmesh.router.registry import WorkerState


class WorkerLoadInput(NamedTuple):
    """One worker's load as the cost model sees it (a named tuple: one per candidate
    per decision, so construction cost counts)."""

    worker_id: str
    active: int
    running: int
    queued_prefill_tokens: int
    kv_usage: float = 0.0
    waiting: int = 0


def load_input(w: WorkerState, adapter: str = "", adapter_load_tokens: int = 0
               ) -> WorkerLoadInput:
    """What the cost model needs of a worker's load (called per candidate per decision:
    plain comparisons, positional fields). A request for ``adapter`` that ``w`` has not
    loaded queues ``adapter_load_tokens`` of prefill-equivalent work before it."""
    load = w.load
    routed, running, active = len(w.in_flight), load.num_running, w.active
    # Routed since the last report and not yet running count as waiting.
    unstarted = active - running
    waiting = unstarted if unstarted > load.num_waiting else load.num_waiting
    queued = load.waiting_uncached_tokens + w.unreported_prefill_tokens
    if adapter and adapter not in w.adapters:
        queued += adapter_load_tokens
    return WorkerLoadInput(
        w.worker_id, active, routed if routed > running else running, queued,
        load.kv_usage, waiting)


def ttft_cost(
    params: CostParams, load: WorkerLoadInput, prompt_tokens: int, cached_tokens: int
) -> float:
    # Called per candidate per decision: plain comparisons instead of min()/max().
    uncached = prompt_tokens - cached_tokens if prompt_tokens > cached_tokens else 0
    rate = params.prefill_tokens_per_s
    prefill = (uncached + load.queued_prefill_tokens) / rate
    per_token = uncached / rate
    # Blocks stored into a full cache evict someone else's prefix: a miss later.
    usage = load.kv_usage
    fullness = 0.0 if usage < 0.0 else 1.0 if usage > 1.0 else usage
    waiting = load.waiting if load.waiting > 0 else 0
    return (prefill + (params.backlog_weight * waiting + params.eviction_weight * fullness)
            * per_token + load.running * params.decode_step_s_per_seq)


def within_bound(params: CostParams, loads: list[WorkerLoadInput]) -> list[WorkerLoadInput]:
    """Workers not above (1+ε)·mean active + 1 (all of them if none qualifies)."""
    if not loads:
        return loads
    mean = sum(x.active for x in loads) / len(loads)
    limit = (1 + params.balance_epsilon) * mean + 1
    kept = [x for x in loads if x.active <= limit]
    return kept or loads


def aggregated_cost(
    params: CostParams, load: WorkerLoadInput, prompt_tokens: int, cached_tokens: int
) -> float:
    """Time to first token on one worker, plus the stall its prefill inflicts on the
    sequences it is decoding."""
    uncached = max(prompt_tokens - cached_tokens, 0)
    stall = params.interference_weight * load.running * uncached / params.prefill_tokens_per_s
    return ttft_cost(params, load, prompt_tokens, cached_tokens) + stall


def disaggregated_cost(
    params: CostParams, prefill: WorkerLoadInput, decode: WorkerLoadInput,
    prompt_tokens: int, prefill_cached_tokens: int,
) -> float:
    """Prefill on ``prefill`` (its queue, its cache), move the KV, then admit on
    ``decode`` (its queued prefills and decode pressure; no prefill of its own)."""
    transfer = params.pd_overhead_s + prompt_tokens / params.kv_transfer_tokens_per_s
    return (ttft_cost(params, prefill, prompt_tokens, prefill_cached_tokens) + transfer
            + ttft_cost(params, decode, prompt_tokens, prompt_tokens))
