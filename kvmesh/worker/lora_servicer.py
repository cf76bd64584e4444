"""kvmesh.v1.LoraAdapters on a worker: protobuf ⇄ its ``AdapterManager`` (thin)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from kvmesh.core.errors import InvalidRequestError
from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.worker.lora import AdapterManager

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["LoraAdapters"].full_name


class LoraAdaptersServicer(worker_pb2_grpc.LoraAdaptersServicer):
    """``after_change`` tells the routers (awaited: once a load or unload answers, the
    router already routes by it)."""

    def __init__(self, adapters: AdapterManager | None,
                 after_change: Callable[[], Awaitable[None]]) -> None:
        self._adapters = adapters
        self._after_change = after_change

    def _manager(self) -> AdapterManager:
        if self._adapters is None:
            raise InvalidRequestError(
                "this worker serves no LoRA adapters (start it with engine.lora, or "
                "`kvmesh up --enable-lora`)", param="lora_name")
        return self._adapters

    async def LoadLoraAdapter(
        self, request: worker_pb2.LoadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadLoraAdapterResponse:
        seconds = await self._manager().load(request.lora_name, request.lora_path)
        await self._after_change()
        return worker_pb2.LoadLoraAdapterResponse(load_seconds=seconds)

    async def UnloadLoraAdapter(
        self, request: worker_pb2.UnloadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.UnloadLoraAdapterResponse:
        await self._manager().unload(request.lora_name)
        await self._after_change()
        return worker_pb2.UnloadLoraAdapterResponse()

    async def ListLoraAdapters(
        self, request: worker_pb2.ListLoraAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ListLoraAdaptersResponse:
        if self._adapters is None:
            return worker_pb2.ListLoraAdaptersResponse()
        return worker_pb2.ListLoraAdaptersResponse(
            adapters=[
                worker_pb2.LoraAdapter(name=name, source=s.source, loaded=loaded,
                                       requests=s.requests, loads=s.loads)
                for name, s, loaded in self._adapters.stats()
            ],
            lora_slots=self._adapters.slots,
        )
