"""`approx_prefix`: Ray Serve LLM's PrefixCacheAffinityRouter idea, as the baseline.

A faithful re-implementation of its algorithm over token ids (kvmesh's router sees
tokens, not text): a prefix tree of what the router *sent* to each worker (not what
the worker actually caches), LRU-evicted per worker past a size threshold. Per
request: when load is balanced (queue spread ≤ threshold) take the workers with the
longest match if the match rate ≥ 10%, else the workers with the smallest trees;
then the least loaded of those. It is approximate: it never hears about evictions,
restarts or other routers' traffic. Ray's defaults are kept: imbalance threshold
infinite, match-rate threshold 0.1, eviction past 400k characters per replica —
100k tokens here, at ~4 characters a token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.router.policy.base import Choice, LoadOnly, RouteContext
from kvmesh.router.registry import WorkerState


@dataclass
class _Node:
    parent: _Node | None
    token: int
    depth: int
    children: dict[int, _Node] = field(default_factory=dict)
    last_access: dict[str, int] = field(default_factory=dict)  # tenant -> tick


#: Eviction brings a tenant's tree down to this share of its budget.
EVICT_TO = 0.9


class ApproxPrefixTree:
    """Token trie with per-tenant ownership and LRU eviction (Ray's PrefixTree shape)."""

    def __init__(self, max_tokens_per_tenant: int = 400_000, max_insert: int = 4096) -> None:
        self.root = _Node(None, -1, 0)
        self.size: dict[str, int] = {}
        self._max = max_tokens_per_tenant
        self._max_insert = max_insert
        self._tick = 0

    def insert(self, tokens: Sequence[int], tenant: str) -> None:
        self._tick += 1
        node = self.root
        node.last_access[tenant] = self._tick
        for token in tokens[: self._max_insert]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node(node, token, node.depth + 1)
            if tenant not in child.last_access:
                self.size[tenant] = self.size.get(tenant, 0) + 1
            child.last_access[tenant] = self._tick
            node = child
        self.size.setdefault(tenant, 0)
        if self.size[tenant] > self._max:
            # Down to a low-water mark, as Ray's periodic eviction does: one walk of the
            # tree per tenth of the budget inserted, not one per insert.
            self._evict(tenant, self.size[tenant] - (self._max - int(self._max * (1 - EVICT_TO))))

    def match(self, tokens: Sequence[int], tenants: Sequence[str]) -> tuple[int, list[str]]:
        """Longest matched length and the tenants owning the deepest matched node."""
        alive = [t for t in tenants if t in self.size]
        if not alive:
            return 0, []
        node = self.root
        matched = 0
        for token in tokens:
            child = node.children.get(token)
            if child is None or not any(t in child.last_access for t in alive):
                break
            node = child
            matched += 1
        return matched, [t for t in alive if t in node.last_access] or list(alive)

    def smallest(self, tenants: Sequence[str]) -> list[str]:
        sizes = {t: self.size.get(t, 0) for t in tenants}
        least = min(sizes.values())
        return [t for t, n in sizes.items() if n == least]

    def remove_tenant(self, tenant: str) -> None:
        self._evict(tenant, self.size.get(tenant, 0))
        self.size.pop(tenant, None)

    def _evict(self, tenant: str, count: int) -> None:
        owned: list[_Node] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if tenant in child.last_access:
                    owned.append(child)
                    stack.append(child)
        owned.sort(key=lambda n: (n.last_access[tenant], -n.depth))
        for node in owned[:count]:
            del node.last_access[tenant]
            self.size[tenant] -= 1
            if not node.last_access and not node.children and node.parent is not None:
                del node.parent.children[node.token]


class ApproxPrefixPolicy(LoadOnly):
    """Its tree is what it sent, not a cache view: it offers the P/D decision no
    cached-token estimate (``LoadOnly``'s hooks)."""

    name = "approx_prefix"

    def __init__(self, rng: random.Random, imbalanced_threshold: float = float("inf"),
                 match_rate_threshold: float = 0.1,
                 max_tokens_per_tenant: int = 100_000) -> None:
        self.tree = ApproxPrefixTree(max_tokens_per_tenant)
        self._rng = rng
        self._imbalanced = imbalanced_threshold
        self._match_rate = match_rate_threshold

    def choose(self, ctx: RouteContext, workers: Sequence[WorkerState]) -> Choice:
        by_id = {w.worker_id: w for w in workers}
        for w in workers:
            self.tree.size.setdefault(w.worker_id, 0)
        loads = [w.active for w in workers]
        reason = "approx_prefix:imbalanced"
        pool = list(workers)
        tokens = [int(t) for t in ctx.token_ids]
        if max(loads) - min(loads) <= self._imbalanced and tokens:
            matched, owners = self.tree.match(tokens, list(by_id))
            if matched / len(tokens) >= self._match_rate:
                pool, reason = [by_id[t] for t in owners], "approx_prefix:match"
            else:
                pool = [by_id[t] for t in self.tree.smallest(list(by_id))]
                reason = "approx_prefix:smallest_tree"
        else:
            pool = self._rng.sample(pool, min(2, len(pool)))
        least = min(w.active for w in pool)
        chosen = self._rng.choice([w for w in pool if w.active == least])
        self.tree.insert(tokens, chosen.worker_id)
        return Choice(chosen, reason)
