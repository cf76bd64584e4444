"""The router's Prometheus metrics (bounded labels: policy, reason, event kind, and
per-worker gauges keyed by worker id — as many series as registered workers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_PREFIX_BUCKETS = (0, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_LATENCY_BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 120.0)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
WORKER_STATES = ("ready", "stale")


@dataclass(frozen=True)
class WorkerSample:
    """One worker as the metrics see it at scrape time."""

    worker_id: str
    role: str
    state: str
    num_running: int
    num_waiting: int
    in_flight: int
    kv_usage: float
    cache_hit_rate: float | None
    indexed_blocks: int


class _WorkerCollector(Collector):
    """Worker counts by role and state, and each worker's load, read at scrape time."""

    def __init__(self, workers: Callable[[], Iterable[WorkerSample]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        samples = list(self._workers())
        count = GaugeMetricFamily(
            "kvmesh_router_workers", "Registered workers by role and state "
            "(ready: seen recently; stale: silent, lease not yet expired)",
            labels=["role", "state"])
        counts: dict[tuple[str, str], int] = {}
        for s in samples:
            counts[(s.role, s.state)] = counts.get((s.role, s.state), 0) + 1
        for role in sorted({s.role for s in samples} | {"both"}):
            for state in WORKER_STATES:
                count.add_metric([role, state], counts.get((role, state), 0))
        yield count
        gauges = {
            "requests": GaugeMetricFamily(
                "kvmesh_router_worker_requests",
                "Per worker: running and waiting as the engine reports, in_flight as routed",
                labels=["worker", "kind"]),
            "kv_usage": GaugeMetricFamily(
                "kvmesh_router_worker_kv_usage", "Per worker: KV cache usage in [0, 1]",
                labels=["worker"]),
            "hit_rate": GaugeMetricFamily(
                "kvmesh_router_worker_cache_hit_rate",
                "Per worker: the engine's prefix-cache hit rate in [0, 1]", labels=["worker"]),
            "indexed": GaugeMetricFamily(
                "kvmesh_router_worker_indexed_blocks",
                "Per worker: KV blocks the router's prefix index holds", labels=["worker"]),
        }
        for s in samples:
            gauges["requests"].add_metric([s.worker_id, "running"], s.num_running)
            gauges["requests"].add_metric([s.worker_id, "waiting"], s.num_waiting)
            gauges["requests"].add_metric([s.worker_id, "in_flight"], s.in_flight)
            gauges["kv_usage"].add_metric([s.worker_id], s.kv_usage)
            if s.cache_hit_rate is not None:
                gauges["hit_rate"].add_metric([s.worker_id], s.cache_hit_rate)
            gauges["indexed"].add_metric([s.worker_id], s.indexed_blocks)
        yield from gauges.values()


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
        self.route_batch_size = Histogram(
            "kvmesh_router_route_batch_size",
            "Routes per RouteBatch call (count: the calls; sum: the routes they carried)",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
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
        self.admission_waiting = Gauge(
            "kvmesh_router_admission_waiting",
            "Route calls waiting for a worker slot (max_inflight_per_worker)", registry=r)
        self.admission_wait_seconds = Histogram(
            "kvmesh_router_admission_wait_seconds",
            "Time a Route call waited for a worker slot", buckets=_WAIT_BUCKETS, registry=r)
        self.load_polls = Counter(
            "kvmesh_router_load_polls",
            "GetLoads polls of workers by outcome: answered, failed, or skipped (the "
            "worker's KV-event stream is open and pushed its load within two probe "
            "intervals, at least 2 s)",
            ["outcome"], registry=r)
        self.adapter_routes = Counter(
            "kvmesh_router_adapter_routes",
            "LoRA requests by whether the chosen worker had the adapter loaded "
            "(loaded) or loads it for the request (load)", ["adapter_state"], registry=r)
        self.index_blocks = Gauge(
            "kvmesh_router_index_blocks", "Distinct blocks in the prefix index", registry=r)
        self.desired_workers = Gauge(
            "kvmesh_router_desired_workers",
            "Workers each pool's load calls for (the autoscaler's answer; an HPA or KEDA "
            "can follow it)", ["model", "role"], registry=r)
        self.pool_need = Gauge(
            "kvmesh_router_pool_need", "Each pool's load in workers (fractional)",
            ["model", "role"], registry=r)

    def track(self, index_blocks: Callable[[], float],
              workers: Callable[[], Iterable[WorkerSample]]) -> None:
        self.index_blocks.set_function(index_blocks)
        self.registry.register(_WorkerCollector(workers))
