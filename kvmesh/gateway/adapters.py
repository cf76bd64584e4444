"""Run-time LoRA adapter loads, as ``vllm serve`` has them: ``POST /v1/load_lora_adapter``
and ``/v1/unload_lora_adapter`` fan out to every LoRA worker of the model
(``kvmesh.v1.LoraAdapters``). A load that fails on any worker is rolled back on the
others, so the adapter is served everywhere or nowhere; the worker's error (naming the
adapter) is the client's answer. A LoRA worker that joins later (a scale-up, a restart)
gets the adapters its model's other workers serve and it does not (``catch_up``), from
the source a worker that has each reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from pydantic import BaseModel, Field

from kvmesh.core.errors import InvalidRequestError, ModelNotFoundError
from kvmesh.gateway.catalog import ModelCatalog, ModelEntry
from kvmesh.gateway.mesh import MeshClient
from kvmesh.v1 import common_pb2, worker_pb2

log = logging.getLogger(__name__)


class LoadLoraAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body, plus ``model`` for a mesh of several
    LoRA models)."""

    model_config = {"extra": "forbid"}

    lora_name: str = Field(description="Name requests use as `model` (or `base:name`).")
    lora_path: str = Field(description="Local adapter folder on the workers' nodes, "
                           "hf://org/name[@revision], s3://bucket/prefix or gs://bucket/prefix.")
    model: str | None = Field(None, description="Base model to load it for; needed only "
                              "when several models serve LoRA adapters.")


class UnloadLoraAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter."""

    model_config = {"extra": "forbid"}

    lora_name: str = Field(description="The adapter to unload.")
    model: str | None = Field(None, description="Its base model, when the name is "
                              "ambiguous.")


class AdapterAdmin:
    def __init__(self, mesh: MeshClient, catalog: ModelCatalog, timeout_s: float) -> None:
        self._mesh = mesh
        self._catalog = catalog
        self._timeout_s = timeout_s
        #: Per (model, adapter): unloads begun, and those under way. A catch-up does not
        #: load an adapter being unloaded, and takes back one whose unload began while
        #: it was loading it.
        self._unloads: dict[tuple[str, str], int] = {}
        self._unloading: set[tuple[str, str]] = set()

    def _lora_model(self, model: str | None) -> ModelEntry:
        if model:
            entry = self._catalog.get(model)
            if not entry.lora_endpoints:
                raise InvalidRequestError(
                    f"the model `{model}` serves no LoRA adapters (its workers run without "
                    "engine.lora; `kvmesh up --enable-lora` turns it on)", param="model")
            return entry
        entries = [e for e in self._catalog.all() if e.lora_endpoints]
        if not entries:
            raise InvalidRequestError(
                "no model of this mesh serves LoRA adapters (`kvmesh up --enable-lora` "
                "turns it on)", param="model")
        if len(entries) > 1:
            raise InvalidRequestError(
                f"several models serve LoRA adapters ({', '.join(e.name for e in entries)}); "
                "name one in `model`", param="model")
        return entries[0]

    async def load(self, body: LoadLoraAdapterRequest) -> ModelEntry:
        entry = self._lora_model(body.model)
        if body.lora_name in entry.adapters:
            raise InvalidRequestError(
                f"The lora adapter '{body.lora_name}' has already been loaded.",
                param="lora_name")
        request = worker_pb2.LoadLoraAdapterRequest(lora_name=body.lora_name,
                                                    lora_path=body.lora_path)
        endpoints = list(entry.lora_endpoints)
        results = await asyncio.gather(
            *(self._mesh.lora_adapters(ep).LoadLoraAdapter(request, timeout=self._timeout_s)
              for ep in endpoints),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            loaded = [ep for ep, r in zip(endpoints, results, strict=True)
                      if not isinstance(r, BaseException)]
            await self._unload_on(loaded, body.lora_name)
            raise failed[0]
        log.info("LoRA adapter %s of %s loaded from %s on %d worker(s)", body.lora_name,
                 entry.name, body.lora_path, len(endpoints))
        self._catalog.adapter_added(entry.name, body.lora_name)
        return entry

    async def unload(self, body: UnloadLoraAdapterRequest) -> ModelEntry:
        if body.model:
            entry = self._lora_model(body.model)
        else:
            owners = [e for e in self._catalog.all() if body.lora_name in e.adapters]
            if len(owners) > 1:
                raise InvalidRequestError(
                    f"LoRA adapter `{body.lora_name}` exists for several models; name one "
                    "in `model`", param="model")
            entry = owners[0] if owners else self._lora_model(None)
        if body.lora_name not in entry.adapters:
            raise ModelNotFoundError(
                f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name")
        key = (entry.name, body.lora_name)
        self._unloads[key] = self._unloads.get(key, 0) + 1
        self._unloading.add(key)
        try:
            await self._unload_everywhere(entry, body.lora_name)
        finally:
            self._unloading.discard(key)
        self._catalog.adapter_removed(entry.name, body.lora_name)
        return entry

    async def _unload_everywhere(self, entry: ModelEntry, name: str) -> None:
        request = worker_pb2.UnloadLoraAdapterRequest(lora_name=name)
        endpoints = list(entry.lora_endpoints)
        results = await asyncio.gather(
            *(self._mesh.lora_adapters(ep).UnloadLoraAdapter(request, timeout=self._timeout_s)
              for ep in endpoints),
            return_exceptions=True)
        for result in results:
            # A worker that never had it (it joined later) is already where we want it.
            if isinstance(result, grpc.aio.AioRpcError) and \
                    result.code() == grpc.StatusCode.NOT_FOUND:
                continue
            if isinstance(result, BaseException):
                raise result
        # Workers that joined meanwhile: a catch-up may have loaded it there.
        with contextlib.suppress(ModelNotFoundError):
            await self._unload_on([ep for ep in self._catalog.get(entry.name).lora_endpoints
                                   if ep not in endpoints], name)

    async def _unload_on(self, endpoints: list[str], name: str) -> None:
        request = worker_pb2.UnloadLoraAdapterRequest(lora_name=name)
        for ep in endpoints:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._mesh.lora_adapters(ep).UnloadLoraAdapter(
                    request, timeout=self._timeout_s)

    async def catch_up(self, joined: list[common_pb2.WorkerInfo],
                       workers: list[common_pb2.WorkerInfo]) -> None:
        """Load onto each joined LoRA worker the adapters the other LoRA workers of its
        model serve and it does not (loaded at run time before it came); failures are
        logged, the worker still serves what it has (the router routes by that)."""
        sources: dict[str, dict[str, str]] = {}  # per holder: its adapters' sources
        for worker in joined:
            if not worker.lora_slots:
                continue
            peers = [p for p in workers if p.model == worker.model and p.lora_slots
                     and p.worker_id != worker.worker_id]
            missing = sorted({a for p in peers for a in p.servable_adapters}
                             - set(worker.servable_adapters))
            for name in missing:
                holder = next(p for p in peers if name in p.servable_adapters)
                unloads = self._unloads.get((worker.model, name), 0)
                if (worker.model, name) in self._unloading:
                    continue
                try:
                    if holder.endpoint not in sources:
                        sources[holder.endpoint] = await self._sources(holder.endpoint)
                    source = sources[holder.endpoint].get(name)
                    if source is None:  # unloaded there meanwhile
                        continue
                    await self._mesh.lora_adapters(worker.endpoint).LoadLoraAdapter(
                        worker_pb2.LoadLoraAdapterRequest(lora_name=name, lora_path=source),
                        timeout=self._timeout_s)
                except grpc.aio.AioRpcError as exc:
                    log.warning("LoRA adapter %s not loaded on joining worker %s: %s", name,
                                worker.worker_id, exc.details() or exc.code().name)
                    continue
                if self._unloads.get((worker.model, name), 0) != unloads:
                    # Unloaded everywhere since this catch-up read the holder's list.
                    await self._unload_on([worker.endpoint], name)
                    continue
                log.info("LoRA adapter %s of %s loaded from %s on joining worker %s", name,
                         worker.model, source, worker.worker_id)

    async def _sources(self, endpoint: str) -> dict[str, str]:
        reply = await self._mesh.lora_adapters(endpoint).ListLoraAdapters(
            worker_pb2.ListLoraAdaptersRequest(), timeout=self._timeout_s)
        return {a.name: a.source for a in reply.adapters}
