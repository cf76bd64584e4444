"""The models the mesh serves, kept current from the router's WatchWorkers stream (the
last worker set stays when no router answers: the gateway then routes on its own),
with the LoRA adapters their workers can serve (a request's ``model`` may name one as
``base:adapter`` or by its plain name)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmesh.core.errors import InvalidRequestError, ModelNotFoundError
from kvmesh.core.lora_config import split_model_field
from kvmesh.v1 import common_pb2, router_pb2

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    name: str
    created: int
    max_context_length: int
    endpoints: list[str] = field(default_factory=list)
    #: LoRA adapters some worker of the model can serve.
    adapters: set[str] = field(default_factory=set)
    #: Workers serving LoRA (run-time adapter loads go to each).
    lora_endpoints: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Resolved:
    """What a request's ``model`` names: a served model, and an adapter of it or ''."""

    entry: ModelEntry
    adapter: str = ""


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
        #: Workers of the last snapshot that the one before did not have.
        self.joined: list[common_pb2.WorkerInfo] = []

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
            entry.adapters.update(w.servable_adapters)
            if w.lora_slots:
                entry.lora_endpoints.append(w.endpoint)
            if w.max_context_length:
                entry.max_context_length = min(
                    entry.max_context_length or w.max_context_length, w.max_context_length
                )
        new = [m for m in fresh if m not in self._models]
        self.gone = [m for m in self._models if m not in fresh]
        known = {w.worker_id for w in self.workers}
        self.joined = [w for w in worker_set.workers if w.worker_id not in known]
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

    def resolve(self, model: str) -> Resolved:
        """The model and adapter a request's ``model`` names: a served model's name,
        ``base:adapter``, or an adapter's plain name (unique across models)."""
        entry = self._models.get(model)
        if entry is not None:
            return Resolved(entry)
        base, adapter = split_model_field(model)
        entry = self._models.get(base)
        if entry is not None and adapter:
            if adapter not in entry.adapters:
                raise ModelNotFoundError(
                    f"The model `{model}` does not exist: `{base}` has no LoRA adapter "
                    f"`{adapter}` (adapters: {', '.join(sorted(entry.adapters)) or 'none'})",
                    param="model")
            return Resolved(entry, adapter)
        owners = [e for e in self._models.values() if model in e.adapters]
        if len(owners) > 1:
            raise InvalidRequestError(
                f"LoRA adapter `{model}` exists for several models "
                f"({', '.join(sorted(e.name for e in owners))}); name one as "
                f"`base:{model}`", param="model")
        if owners:
            return Resolved(owners[0], model)
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

    def adapter_added(self, model: str, adapter: str) -> None:
        """A run-time load succeeded on the model's workers: serve it at once (the
        router's next worker set says the same)."""
        entry = self._models.get(model)
        if entry is not None:
            entry.adapters.add(adapter)

    def adapter_removed(self, model: str, adapter: str) -> None:
        entry = self._models.get(model)
        if entry is not None:
            entry.adapters.discard(adapter)

    def names(self) -> list[str]:
        return list(self._models)

    def model_ids(self) -> list[str]:
        """Every ``model`` a request may name: models, adapters, ``base:adapter``."""
        ids = list(self._models)
        for entry in self._models.values():
            ids += [*entry.adapters, *(f"{entry.name}:{a}" for a in entry.adapters)]
        return ids

    def cards(self) -> list[tuple[str, str, ModelEntry]]:
        """(id, parent, model) per base model (parent '') and per adapter, as
        /v1/models lists them."""
        return [row for e in self.all()
                for row in [(e.name, "", e), *((a, e.name, e) for a in sorted(e.adapters))]]

    def all(self) -> list[ModelEntry]:
        return sorted(self._models.values(), key=lambda e: e.name)


def follow(catalog: ModelCatalog, on_new_model: Callable[[ModelEntry], None],
           on_gone_model: Callable[[str], None] | None = None,
           on_joined: Callable[[list[common_pb2.WorkerInfo]], None] | None = None,
           ) -> Callable[[router_pb2.WorkerSet], None]:
    """What to do with each worker set the router sends: apply it, announce new models,
    forget a model whose last worker left (its pool may come back with other weights),
    hand over the workers that joined."""

    def on_set(worker_set: router_pb2.WorkerSet) -> None:
        for model in catalog.apply(worker_set):
            log.info("model %s is now served", model)
            on_new_model(catalog.get(model))
        for model in catalog.gone:
            log.info("model %s is no longer served", model)
            if on_gone_model is not None:
                on_gone_model(model)
        if catalog.joined and on_joined is not None:
            on_joined(catalog.joined)

    return on_set
