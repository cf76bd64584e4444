"""The router's Prometheus metrics (bounded labels: policy, reason, event kind)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PREFIX_BUCKETS = (0, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_LATENCY_BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "kvmesh_router_decisions", "Routing decisions", ["policy", "reason"], registry=r)
        self.decision_seconds = Histogram(
            "kvmesh_router_decision_seconds", "Time to decide one route", ["policy"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.matched_prefix_tokens = Histogram(
            "kvmesh_router_matched_prefix_tokens",
            "Prompt tokens the chosen worker was expected to have cached",
            buckets=_PREFIX_BUCKETS, registry=r)
        self.kv_event_blocks = Counter(
            "kvmesh_router_kv_event_blocks", "Blocks in KV events applied", ["kind"],
            registry=r)
        self.kv_event_gaps = Counter(
            "kvmesh_router_kv_event_gaps", "Sequence gaps in workers' KV event streams",
            registry=r)
        self.kv_event_resets = Counter(
            "kvmesh_router_kv_event_resets",
            "Worker views dropped and rebuilt (gap, restart, lost history)", registry=r)
        self.kv_event_lag_seconds = Histogram(
            "kvmesh_router_kv_event_lag_seconds",
            "Delay between an engine publishing KV events and the router applying them",
            buckets=_LAG_BUCKETS, registry=r)
        self.index_blocks = Gauge(
            "kvmesh_router_index_blocks", "Distinct blocks in the prefix index", registry=r)
        self.workers = Gauge("kvmesh_router_workers", "Registered workers", registry=r)

    def track(self, index_blocks: Callable[[], float], workers: Callable[[], float]) -> None:
        self.index_blocks.set_function(index_blocks)
        self.workers.set_function(workers)
