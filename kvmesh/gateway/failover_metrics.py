"""Prometheus counters of the gateway's failure handling (served on its /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class FailoverMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.failovers = Counter(
            "kvmesh_gateway_failovers",
            "Streams whose worker was lost after their first token, by outcome: resumed "
            "(finished on another worker) or error (not resumable, or no worker left)",
            ["outcome"], registry=r)
        self.retries = Counter(
            "kvmesh_gateway_worker_retries",
            "Requests routed again because their worker was lost before its first token",
            registry=r)
        self.ejections = Counter(
            "kvmesh_gateway_worker_ejections",
            "Workers ejected by outlier detection (consecutive failures)", ["worker"],
            registry=r)
        self.local_routes = Counter(
            "kvmesh_gateway_local_routes",
            "Requests the gateway routed on its own because no router replica answered",
            registry=r)
        self.router_failovers = Counter(
            "kvmesh_gateway_router_failovers",
            "Route calls that failed on a router replica and went to the next one",
            ["router"], registry=r)
