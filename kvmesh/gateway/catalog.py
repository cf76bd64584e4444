"""The models the mesh serves, kept current from the router's WatchWorkers stream (the
last worker set stays when no router answers: the gateway then routes on its own)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.v1 import common_pb2, router_pb2

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    name: str
    created: int
    max_context_length: int
    endpoints: list[str] = field(default_factory=list)


class ModelCatalog:
    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}
        #: The router's last worker set, and its metrics endpoint (service discovery).
        self.workers: list[common_pb2.WorkerInfo] = []
        #: The gateway replicas registered with the router (the endpoint picker's set).
        self.gateways: list[common_pb2.WorkerInfo] = []
        #: Workers of that set the router took out of routing (their probe failed).
        self.unreachable: set[str] = set()
        self.router_metrics_endpoint = ""
        self.version = -1
        self.changed = asyncio.Event()
        #: Models the last snapshot no longer serves.
        self.gone: list[str] = []

    def apply(self, worker_set: router_pb2.WorkerSet) -> list[str]:
        """Replace the view with a router snapshot; return newly seen models (the ones
        no longer served are in :attr:`gone`)."""
        fresh: dict[str, ModelEntry] = {}
        for w in worker_set.workers:
            entry = fresh.get(w.model)
            if entry is None:
                old = self._models.get(w.model)
                entry = fresh[w.model] = ModelEntry(
                    name=w.model,
                    created=old.created if old else int(time.time()),
                    max_context_length=w.max_context_length,
                )
            entry.endpoints.append(w.endpoint)
            if w.max_context_length:
                entry.max_context_length = min(
                    entry.max_context_length or w.max_context_length, w.max_context_length
                )
        new = [m for m in fresh if m not in self._models]
        self.gone = [m for m in self._models if m not in fresh]
        self._models = fresh
        self.workers = list(worker_set.workers)
        self.gateways = list(worker_set.gateways)
        self.unreachable = set(worker_set.unreachable_worker_ids)
        self.router_metrics_endpoint = worker_set.router_metrics_endpoint
        self.version = worker_set.version
        self.changed.set()
        self.changed = asyncio.Event()
        return new

    def get(self, model: str) -> ModelEntry:
        entry = self._models.get(model)
        if entry is None:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
        return entry

    def names(self) -> list[str]:
        return list(self._models)

    def all(self) -> list[ModelEntry]:
        return sorted(self._models.values(), key=lambda e: e.name)


def follow(catalog: ModelCatalog, on_new_model: Callable[[ModelEntry], None],
           on_gone_model: Callable[[str], None] | None = None,
           ) -> Callable[[router_pb2.WorkerSet], None]:
    """What to do with each worker set the router sends: apply it, announce new models,
    forget a model whose last worker left (its pool may come back with other weights)."""

    def on_set(worker_set: router_pb2.WorkerSet) -> None:
        for model in catalog.apply(worker_set):
            log.info("model %s is now served", model)
            on_new_model(catalog.get(model))
        for model in catalog.gone:
            log.info("model %s is no longer served", model)
            if on_gone_model is not None:
                on_gone_model(model)

    return on_set
