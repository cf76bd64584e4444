"""The cost model over all candidates in one compiled pass (numba; pure).

``cost_model`` states the formulas per candidate; ``cost_vector`` applies them to every
candidate of a decision through these kernels. One decision used to be ~30 numpy calls
over a few to a few hundred candidates (the load bound, a gather per load column, the
cost's terms, the near-equals), each a microsecond or more of call overhead whatever
the size: ``near_equals`` does the whole step in one call. Every kernel goes through
``_terms`` and ``_bound``, so the formulas are written once; the arithmetic is done in
the same order as the per-candidate formulas (no fastmath), so the results are the same
floats (``tests/unit/test_cost_vector.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from kvmesh.router.kernels.tables import mix

F64 = np.ndarray[Any, np.dtype[np.float64]]
I64 = np.ndarray[Any, np.dtype[np.int64]]


@njit(cache=True, inline="always")
def _terms(prompt_tokens: float, cached: float, queued: float, waiting: float, kv: float,
           running: float, tokens_per_s: float, backlog_weight: float,
           eviction_weight: float, decode_step_s: float
           ) -> tuple[float, float, float, float, float]:
    """The prompt's uncached prefill time, then the load terms (``cost_vector.TERMS``:
    queued prefill, backlog, eviction, running), in seconds."""
    per_token = max(prompt_tokens - cached, 0.0) / tokens_per_s
    return (per_token, queued / tokens_per_s,
            backlog_weight * max(waiting, 0.0) * per_token,
            eviction_weight * min(max(kv, 0.0), 1.0) * per_token,
            running * decode_step_s)


@njit(cache=True, inline="always")
def _bound(active: F64, epsilon: float) -> float:
    """The load bound: (1+ε)·mean active + 1."""
    return (1 + epsilon) * (active.sum() / len(active)) + 1


@njit(cache=True, nogil=True)
def load_terms(prompt_tokens: float, cached: F64, queued: F64, waiting: F64, kv: F64,
               running: F64, tokens_per_s: float, backlog_weight: float,
               eviction_weight: float, decode_step_s: float) -> Any:
    """Rows: each candidate's uncached prefill time and its four load terms (they add
    up to its cost)."""
    out = np.empty((5, len(cached)))
    for i in range(len(cached)):
        out[:, i] = _terms(prompt_tokens, cached[i], queued[i], waiting[i], kv[i],
                           running[i], tokens_per_s, backlog_weight, eviction_weight,
                           decode_step_s)
    return out


@njit(cache=True, nogil=True)
def near_equals(active: F64, running: F64, queued: F64, kv: F64, waiting: F64,
                cached: F64, prompt_tokens: float, epsilon: float, tokens_per_s: float,
                backlog_weight: float, eviction_weight: float, decode_step_s: float,
                slack_s: float) -> Any:
    """One decision's step from loads to the near-equals: the candidates within the
    load bound (``kept``, positions), their costs, and the kept ones within
    ``slack_s`` of the cheapest (``near``, positions)."""
    n = len(active)
    bound = _bound(active, epsilon)
    kept = np.nonzero(active <= bound)[0]
    if len(kept) == 0:
        kept = np.arange(n)
    costs = np.empty(len(kept))
    cheapest = np.inf
    for j in range(len(kept)):
        i = kept[j]
        p, q, b, e, r = _terms(prompt_tokens, cached[i], queued[i], waiting[i], kv[i],
                               running[i], tokens_per_s, backlog_weight, eviction_weight,
                               decode_step_s)
        costs[j] = p + q + b + e + r
        cheapest = min(cheapest, costs[j])
    near = kept[costs <= cheapest + slack_s + 1e-9]
    return kept, costs, near


@njit(cache=True, nogil=True)
def load_gather(rows: Any, routed: F64, running: F64, waiting: F64, kv: F64, uncached: F64,
                unreported: F64, kv_floor: F64) -> Any:
    """The candidates' load columns from the registry's table rows, in one pass:
    (active, running, queued prefill tokens, KV usage, waiting) as
    ``cost_vector.load_arrays`` defines them (routed since the last report and not yet
    running count as waiting). KV usage is at least ``kv_floor`` (per candidate; empty:
    no floor)."""
    n = len(rows)
    active, run, queued = np.empty(n), np.empty(n), np.empty(n)
    usage, wait = np.empty(n), np.empty(n)
    for j in range(n):
        i = rows[j]
        r, w = running[i], waiting[i]
        active[j] = max(routed[i], r + w)
        run[j] = max(routed[i], r)
        queued[j] = uncached[i] + unreported[i]
        usage[j] = max(kv[i], kv_floor[j]) if len(kv_floor) else kv[i]
        wait[j] = max(active[j] - r, w)
    return active, run, queued, usage, wait


@njit(cache=True, nogil=True)
def rendezvous_pick(key: Any, salts: Any, near: Any) -> int:
    """The position in ``near`` whose worker (``salts[near[j]]``) scores highest for
    ``key`` (splitmix64's finaliser of key xor salt; the first on a tie, as argmax)."""
    key = np.uint64(key)
    best, at = mix(key ^ salts[near[0]]), 0
    for j in range(1, len(near)):
        score = mix(key ^ salts[near[j]])
        if score > best:
            best, at = score, j
    return at
