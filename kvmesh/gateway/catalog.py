"""The models the mesh serves, kept current from the router's WatchWorkers stream,
with the LoRA adapters their workers can serve (a request's ``model`` may name one as
``base:adapter`` or by its plain name)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from kvmesh.core.errors import InvalidRequestError, ModelNotFoundError
from kvmesh.core.lora_config import split_model_field
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

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
        self.router_metrics_endpoint = ""
        self.version = -1
        self.changed = asyncio.Event()

    def apply(self, worker_set: router_pb2.WorkerSet) -> list[str]:
        """Replace the view with a router snapshot; return newly seen models."""
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
        self._models = fresh
        self.workers = list(worker_set.workers)
        self.gateways = list(worker_set.gateways)
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


async def watch_router(
    stub: router_pb2_grpc.RouterStub, catalog: ModelCatalog, on_new_model: object
) -> None:
    """Follow WatchWorkers forever, reconnecting with backoff."""
    backoff = 0.2
    while True:
        try:
            async for worker_set in stub.WatchWorkers(router_pb2.WatchWorkersRequest()):
                backoff = 0.2
                for model in catalog.apply(worker_set):
                    log.info("model %s is now served", model)
                    if callable(on_new_model):
                        on_new_model(catalog.get(model))
        except grpc.aio.AioRpcError as exc:
            log.warning("router watch broken (%s); reconnecting", exc.code().name)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
