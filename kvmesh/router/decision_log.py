"""Every kv_aware decision's workings as JSON lines (``RouterConfig.decision_log``).

For explaining routing after the fact — why a request went where it went — without a
debugger: per candidate what the router counted as cached (by events and pending marks,
and by events alone), whether it passed the load bound, its cost split into the cost
model's terms, and which were near-equal. ``kvmesh bench routing --mode real`` joins
these lines with what vLLM reported to put each avoidable miss down to a rule
(``kvmesh/bench/routing/misses.py``). Off by default: it costs a second index match
and a write per decision.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from kvmesh.core.config import CostParams
from kvmesh.router.cost_vector import TERMS, LoadArrays, load_terms
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.policy.kv_aware import Evaluation
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.registry import WorkerState


def cost_terms(params: CostParams, ev: Evaluation, prompt_tokens: int
               ) -> dict[int, dict[str, float]]:
    """Each kept candidate's cost split into the cost model's load terms (seconds),
    by its position among the candidates."""
    kept = ev.kept
    terms = load_terms(params, LoadArrays(*(a[kept] for a in ev.loads)), prompt_tokens,
                       ev.cached[kept])
    return {at: {name: float(values[i]) for name, values in zip(TERMS, terms, strict=True)}
            for i, at in enumerate(kept.tolist())}


def record(ctx: RouteContext, ev: Evaluation, workers: Sequence[WorkerState],
           index: PrefixIndex, params: CostParams) -> dict[str, object]:
    """One decision as a JSON-able dict (candidates in the evaluation's order)."""
    ids = [w.worker_id for w in workers]
    size = workers[ev.chosen].block_size
    hashes = ev.hashes_by_size.get(size)
    confirmed = (index.match(hashes, ids, pending_marks=False) if hashes is not None
                 else dict.fromkeys(ids, 0))
    terms = cost_terms(params, ev, len(ctx.token_ids))
    return {
        "request_id": ctx.request_id, "prompt_tokens": len(ctx.token_ids),
        "workers": ids, "chosen": ev.chosen, "block_size": size,
        "view": [int(v) for v in ev.cached.tolist()],
        "confirmed": [confirmed[w] * size for w in ids],
        "kept": ev.kept.tolist(), "near": ev.near.tolist(),
        "terms": {str(at): {k: round(v, 6) for k, v in t.items()} for at, t in terms.items()},
    }


class DecisionLog:
    """Appends one JSON line per kv_aware decision to ``path``."""

    def __init__(self, path: Path, index: PrefixIndex, params: CostParams) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", buffering=1)
        self._index = index
        self._params = params

    def write(self, ctx: RouteContext, ev: Evaluation, workers: Sequence[WorkerState]
              ) -> None:
        self._file.write(json.dumps(record(ctx, ev, workers, self._index, self._params))
                         + "\n")

    def close(self) -> None:
        self._file.close()


def read(path: Path) -> dict[str, dict[str, object]]:
    """A decision log by request id (the last line of an id wins)."""
    out: dict[str, dict[str, object]] = {}
    with path.open() as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                out[str(entry["request_id"])] = entry
    return out
