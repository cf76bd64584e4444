"""Why a request missed cache it could have hit: the miss analysis of a routing run.

For every request the analysis keeps what the router saw when it decided (its
``KvAwarePolicy.evaluate`` workings: each candidate's cached prefix by events and
pending marks, the load bound, the costs, the near-equals) and what was true: the
prefix each worker really held when the request arrived and when its prefill started,
and what the engine then reused. A request whose reuse fell short of the best any
worker held at either moment is an *avoidable miss*, and is put down to the first rule
that explains it:

- ``evicted_while_queued``: the chosen worker held the best prefix at arrival and lost
  part of it before the request's prefill started (an eviction the router cannot see
  coming: vLLM's LRU moved under a queue);
- ``arrived_later``: the better worker got the prefix only after the decision (from a
  request routed later but prefilled earlier);
- ``index_behind``: the better worker already held it, its events had not told the
  router yet;
- ``pending_unrealized``: the router counted blocks on the chosen worker that only
  pending marks claimed (a request queued there whose blocks were evicted or never
  stored);
- ``stale_holder``: the router's events said the chosen worker held blocks it no
  longer did;
- ``bounded_load``: the better worker was over the load bound;
- ``placement_home``: the better worker was among the near-equal costs and the
  rendezvous home was another;
- ``load:<term>``: the cost model priced the better worker higher by more than the
  slack; ``<term>`` is the term that differed most (``queued_prefill``, ``backlog``,
  ``eviction``, ``running``).

Real engines cannot be looked into at arrival, so a real run (``classify_logged``: the
router's decision log joined with what vLLM reported) measures against the oracle
instead — the prefix an unbounded fleet-wide cache would hold — and tells apart what the
router can see: ``evicted_or_stale`` (its events said the chosen worker held more than
vLLM reused: evicted while the request queued, or a removal not yet reported),
``pending_unrealized``, ``bounded_load``, ``placement_home``, ``load:<term>`` as above,
and ``not_held`` (no worker held it by the router's view: evicted everywhere, as when
the hot set outgrows the fleet's caches, or stored but not yet reported).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmesh.core.config import CostParams
from kvmesh.router.cost_vector import TERMS
from kvmesh.router.decision_log import cost_terms
from kvmesh.router.policy.kv_aware import Evaluation


@dataclass
class _Decision:
    prompt_tokens: int
    truth: list[int]  # prompt tokens each worker held at arrival (capped at prompt-1)
    view: list[float]  # what the router counted: events and pending marks
    confirmed: list[int]  # what the router counted from events alone
    kept: set[int]
    near: set[int]
    terms: dict[int, dict[str, float]]  # per kept candidate: the cost's load terms
    chosen: int


class MissAnalysis:
    """Collects decisions and outcomes of one run; ``summary`` classifies the misses."""

    def __init__(self, params: CostParams, block_size: int) -> None:
        self.params = params
        self.block_size = block_size
        self._decisions: dict[str, _Decision] = {}
        self._outcomes: dict[str, tuple[int, list[int]]] = {}

    def decided(self, request_id: str, ev: Evaluation, prompt_tokens: int,
                truth: Sequence[int], confirmed: Sequence[int]) -> None:
        """The router decided (``ev``); ``truth``/``confirmed`` per candidate in the
        evaluation's order, in tokens."""
        cap = prompt_tokens - 1
        self._decisions[request_id] = _Decision(
            prompt_tokens, [min(t, cap) for t in truth],
            [min(float(v), cap) for v in ev.cached.tolist()],
            [min(c, cap) for c in confirmed], set(ev.kept.tolist()),
            set(ev.near.tolist()), cost_terms(self.params, ev, prompt_tokens), ev.chosen)

    def scheduled(self, request_id: str, reused: int, truth: Sequence[int]) -> None:
        """The request's prefill started: it reused ``reused`` tokens; ``truth`` is what
        each worker held then (the evaluation's order)."""
        self._outcomes[request_id] = (reused, list(truth))

    def classify(self, request_id: str) -> tuple[str, int] | None:
        """The rule behind the request's avoidable miss and the tokens it lost, or None
        when it reused as much as any worker held."""
        d = self._decisions[request_id]
        reused, later = self._outcomes[request_id]
        cap = d.prompt_tokens - 1
        later = [min(t, cap) for t in later]
        best_then, best_later = max(d.truth), max(later)
        lost = max(best_then, best_later) - reused
        if lost < self.block_size:
            return None
        if best_then >= best_later:
            if d.truth[d.chosen] >= best_then:
                return "evicted_while_queued", lost
            better = _most_liked([i for i, t in enumerate(d.truth) if t == best_then],
                                 d.kept, d.near, d.terms)
            if d.view[better] < d.truth[better]:
                return "index_behind", lost
        else:
            better = _most_liked([i for i, t in enumerate(later) if t == best_later],
                                 d.kept, d.near, d.terms)
            if d.view[better] < later[better]:
                return "arrived_later", lost
        if d.view[d.chosen] > d.truth[d.chosen] + self.block_size - 1:
            if d.confirmed[d.chosen] <= d.truth[d.chosen]:
                return "pending_unrealized", lost
            return "stale_holder", lost
        return _passed_over(better, d.chosen, d.kept, d.near, d.terms), lost

    def summary(self) -> dict[str, object]:
        """Avoidable misses by rule: requests and prompt tokens lost, with the totals."""
        return tally(map(self.classify, self._outcomes),
                     sum(self._decisions[r].prompt_tokens for r in self._outcomes),
                     len(self._outcomes))


def classify_logged(entry: dict[str, Any], reused: int, oracle: int
                    ) -> tuple[str, int] | None:
    """A real run's request: its decision-log ``entry`` (``router/decision_log.py``),
    the tokens vLLM reused and the oracle's; the rule behind its avoidable miss and the
    tokens lost, or None."""
    size = int(entry["block_size"]) or 1
    lost = oracle - reused
    if lost < size:
        return None
    chosen = int(entry["chosen"])
    view, confirmed = entry["view"], entry["confirmed"]
    if view[chosen] - reused >= size:
        return ("evicted_or_stale" if confirmed[chosen] - reused >= size
                else "pending_unrealized"), lost
    best = max(view)
    if best - view[chosen] < size:
        return "not_held", lost
    terms = {int(k): v for k, v in entry["terms"].items()}
    kept, near = set(entry["kept"]), set(entry["near"])
    better = _most_liked([i for i, v in enumerate(view) if v == best], kept, near, terms)
    return _passed_over(better, chosen, kept, near, terms), lost


def _most_liked(holders: list[int], kept: set[int], near: set[int],
                terms: dict[int, dict[str, float]]) -> int:
    """Of the workers holding the best prefix, the one the router came closest to
    choosing: near-equal before merely kept, then the cheapest."""
    def score(i: int) -> tuple[int, float]:
        costs = terms.get(i)
        return (i in near) + (i in kept), -(sum(costs.values()) if costs else math.inf)
    return max(holders, key=score)


def _passed_over(better: int, chosen: int, kept: set[int], near: set[int],
                 terms: dict[int, dict[str, float]]) -> str:
    """Why the router, seeing ``better`` hold more, chose ``chosen``: the load bound
    excluded it, the rendezvous home among near-equals was another, or a load term
    (the one that differed most) priced it higher."""
    if better not in kept:
        return "bounded_load"
    if better in near:
        return "placement_home"
    mine, theirs = terms[chosen], terms[better]
    return "load:" + max(TERMS, key=lambda t: theirs[t] - mine[t])


def tally(found: Iterable[tuple[str, int] | None], prompt_tokens: int, requests: int
          ) -> dict[str, object]:
    """Avoidable misses by rule: requests and prompt tokens lost, with the totals."""
    counts: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for item in found:
        if item is not None:
            counts[item[0]] += 1
            tokens[item[0]] += item[1]
    lost = sum(tokens.values())
    share = (lambda n: round(n / prompt_tokens, 4)) if prompt_tokens else (lambda n: 0.0)
    return {
        "requests": requests,
        "avoidable_misses": sum(counts.values()),
        "hit_rate_lost": share(lost),
        "by_rule": {rule: {"requests": n, "tokens": tokens[rule],
                           "hit_rate_lost": share(tokens[rule])}
                    for rule, n in counts.most_common()},
    }
