"""Prometheus HTTP service discovery for the whole mesh (pure).

``GET /sd/prometheus`` answers the standard ``[{"targets": [...], "labels": {...}}]``
JSON (https://prometheus.io/docs/prometheus/latest/http_sd/): the gateway itself, the
router and every worker that registered a metrics endpoint. All serve ``/metrics``,
so no ``__metrics_path__`` is needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kvmesh.core.roles import role_from_proto
from kvmesh.v1 import common_pb2


def prometheus_targets(
    gateway: str, router: str, workers: Iterable[common_pb2.WorkerInfo]
) -> list[dict[str, Any]]:
    """Target groups: one per service instance (labels differ per worker)."""
    groups: list[dict[str, Any]] = []
    if gateway:
        groups.append({"targets": [gateway], "labels": {"kvmesh_service": "gateway"}})
    if router:
        groups.append({"targets": [router], "labels": {"kvmesh_service": "router"}})
    for w in sorted(workers, key=lambda w: w.worker_id):
        if not w.metrics_endpoint:
            continue  # e.g. a plain vLLM gRPC server registered by address
        groups.append({
            "targets": [w.metrics_endpoint],
            "labels": {"kvmesh_service": "worker", "kvmesh_worker": w.worker_id,
                       "kvmesh_model": w.model, "kvmesh_role": role_from_proto(w.role).value},
        })
    return groups
