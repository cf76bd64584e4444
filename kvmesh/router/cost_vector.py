"""The cost model over all candidates at once (numpy), for fleets of hundreds.

Same formulas as ``cost_model`` (``load_input``, ``within_bound``, ``ttft_cost``), the
per-candidate Python replaced by one pass that reads each worker's raw numbers and
array arithmetic for the rest; ``tests/unit/test_cost_vector.py`` checks both agree.
Rendezvous scores likewise: splitmix64 over uint64 arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from kvmesh.core.config import CostParams
from kvmesh.router.kernels import costs
from kvmesh.router.load_table import LoadTable
from kvmesh.router.registry import Candidates, WorkerState
from kvmesh.router.salts import id_salts

F64 = np.ndarray[Any, np.dtype[np.float64]]
I64 = np.ndarray[Any, np.dtype[np.int64]]


class LoadArrays(NamedTuple):
    """Per candidate, in the candidates' order: what ``WorkerLoadInput`` holds."""

    active: F64
    running: F64
    queued_prefill_tokens: F64
    kv_usage: F64
    waiting: F64


_LOAD = attrgetter("load")
_IN_FLIGHT = attrgetter("in_flight")
_UNREPORTED = attrgetter("unreported_prefill_tokens")
_RAW = [attrgetter(name) for name in ("num_running", "num_waiting",
                                      "waiting_uncached_tokens", "kv_usage")]


_NO_FLOOR = np.zeros(0)


def column(values: Iterable[float], n: int) -> F64:
    return np.fromiter(values, np.float64, n)


def _rows(workers: Sequence[WorkerState]) -> tuple[LoadTable | None, Any]:
    """The workers' load table and rows: a registry selection's own, else looked up
    (None, None unless they are all in one table)."""
    if isinstance(workers, Candidates) and workers.loads is not None \
            and len(workers.rows) == len(workers):
        return workers.loads, workers.rows
    table = workers[0].loads if workers else None
    return table, table.rows(workers) if table is not None else None


def load_arrays(workers: Sequence[WorkerState], adapter: str = "",
                adapter_load_tokens: int = 0, kv_floor: F64 | None = None) -> LoadArrays:
    """The workers' raw numbers, gathered from the registry's load table
    (``load_table.py``) when they are all registered in one, else read column by
    column (C-level ``map`` passes); combined in one compiled pass
    (``kernels.costs.load_gather``). A request for ``adapter`` that a worker has not
    loaded queues ``adapter_load_tokens`` of prefill-equivalent work there first
    (``cost_model.load_input``). ``kv_floor``: a lower bound on each one's KV usage
    (what its cache holds by the index, ``KvAwarePolicy._held``)."""
    n = len(workers)
    table, rows = _rows(workers)
    if table is not None and rows is not None:  # the registry's columns
        columns = (table.routed, table.running, table.waiting, table.kv_usage,
                   table.uncached, table.unreported)
    else:  # workers of no registry (tests, simulations): read them one by one
        loads = list(map(_LOAD, workers))
        running, waiting, uncached, kv = (column(map(get, loads), n) for get in _RAW)
        columns = (column(map(len, map(_IN_FLIGHT, workers)), n), running, waiting, kv,
                   uncached, column(map(_UNREPORTED, workers), n))
        rows = np.arange(n, dtype=np.intp)
    arrays = LoadArrays(*costs.load_gather(rows, *columns,
                                           _NO_FLOOR if kv_floor is None else kv_floor))
    if adapter and adapter_load_tokens:
        arrays.queued_prefill_tokens[:] += adapter_load_tokens * column(
            (adapter not in w.adapters for w in workers), n)
    return arrays


#: The cost model's load terms, in the order ``load_terms`` returns them.
TERMS = ("queued_prefill", "backlog", "eviction", "running")


def _coefficients(params: CostParams) -> tuple[float, float, float, float]:
    return (params.prefill_tokens_per_s, params.backlog_weight, params.eviction_weight,
            params.decode_step_s_per_seq)


def load_terms(params: CostParams, loads: LoadArrays, prompt_tokens: int, cached_tokens: F64
               ) -> tuple[F64, F64, F64, F64]:
    """What each load term adds to every candidate's cost, in seconds (``TERMS``):
    prefill queued there, the backlog's and the eviction's price of this prompt's
    uncached tokens, the decode pressure."""
    rows = costs.load_terms(float(prompt_tokens), cached_tokens,
                            loads.queued_prefill_tokens, loads.waiting, loads.kv_usage,
                            loads.running, *_coefficients(params))
    return rows[1], rows[2], rows[3], rows[4]


def near_equals(params: CostParams, loads: LoadArrays, prompt_tokens: int,
                cached_tokens: F64) -> tuple[I64, F64, I64]:
    """One compiled pass from the candidates' loads to the near-equals: the positions
    within the load bound ((1+ε)·mean active + 1; all when none is), their costs
    (``cost_model.ttft_cost``: the uncached prefill plus the load terms), and the
    positions among them within the placement slack of the cheapest."""
    slack = params.placement_slack * prompt_tokens / params.prefill_tokens_per_s
    kept, kept_costs, near = costs.near_equals(
        *loads, cached_tokens, float(prompt_tokens), params.balance_epsilon,
        *_coefficients(params), slack)
    return kept, kept_costs, near


def rendezvous_scores(key: int, salts: np.ndarray[Any, np.dtype[np.uint64]]
                      ) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """splitmix64's finaliser over ``key`` xor each salt (``kv_aware.rendezvous_score``
    for many workers at once; uint64 arithmetic wraps as the masked ints do)."""
    with np.errstate(over="ignore"):
        x = np.uint64(key) ^ salts
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def rendezvous_pick(key: int, workers: Sequence[WorkerState], near: I64) -> int:
    """The position among ``workers`` of the near-equal (``near``: positions) with the
    highest rendezvous score for ``key``: one compiled pass over a selection's kept
    salts (``rendezvous_scores``' argmax, without its arrays)."""
    if isinstance(workers, Candidates):
        return int(near[costs.rendezvous_pick(np.uint64(key), workers.salts, near)])
    return int(near[int(np.argmax(rendezvous_scores(key, near_salts(workers, near))))])


def salts(workers: Sequence[WorkerState]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """The workers' rendezvous salts."""
    return id_salts([w.worker_id for w in workers])


def near_salts(workers: Sequence[WorkerState], near: np.ndarray
               ) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """The salts of ``workers[near]``: gathered from the selection's own array (worked
    out once per selection: no Python list per decision), or looked up for a plain
    sequence."""
    if isinstance(workers, Candidates):
        return workers.salts[near]
    return salts([workers[i] for i in near.tolist()])
