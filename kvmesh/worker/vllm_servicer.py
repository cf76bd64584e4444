"""vLLM's own VllmEngine servicer (smg-grpc-servicer), with three changes.

``GetServerInfo`` reports no uptime; the router dates a worker's incarnation by it
(a router restarted from a snapshot restores only the same incarnation's cache view),
so it is added here from the servicer's start time.

The library reads running/waiting counts from the engine's last ``SchedulerStats``.
An engine that goes idle never publishes another one, so after its last request
finishes (or is aborted) it would report that request as running forever — and the
router would steer traffic away from an idle worker. When the engine's output
processor holds no unfinished request, the worker is idle, whatever the last
snapshot said.

LoRA: the contract has no adapter field, so a Generate call names its adapter in
gRPC metadata (``kvmesh.core.lora_config.ADAPTER_METADATA_KEY``); the worker loads it
on demand (``kvmesh.worker.lora``) and hands vLLM the ``LoRARequest`` through the
engine's ``generate``. The KV-event relay keeps only the adapter's numeric id on
stored blocks; the adapter's name is filled in, as the router namespaces by name.

KV events: the library's relay is run once for the worker's life and shared
(``kvmesh.worker.kv_fanout``): a subscriber resumes from its cursor while the history
holds it, and otherwise starts from a snapshot of the blocks the engine holds, where
the library's relay refuses a cursor and serves live batches only. A subscriber that
asks for load records before the first batch gets heartbeats from the start
(``kvmesh.worker.kv_heartbeat``), not only after the engine's first batch as the
library's relay sends them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from smg_grpc_proto import vllm_engine_pb2
from smg_grpc_proto.generated import common_pb2 as smg_common_pb2
from smg_grpc_servicer.load_record import HEARTBEAT_INTERVAL
from smg_grpc_servicer.vllm.servicer import VllmEngineServicer

from kvmesh.core.errors import InvalidRequestError
from kvmesh.worker.kv_fanout import KvEventFanout, RelayEnded
from kvmesh.worker.kv_heartbeat import early_heartbeat, with_early_heartbeats
from kvmesh.worker.lora import AdapterManager, adapter_of, lora_request, name_adapter_blocks


class _AdapterEngine:
    """The engine as the servicer sees it: ``generate`` gains the request's
    ``LoRARequest``; everything else is the engine's own."""

    def __init__(self, engine: Any, lora_requests: dict[str, Any]) -> None:
        self._engine = engine
        self._lora_requests = lora_requests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        lora = self._lora_requests.get(kwargs.get("request_id", ""))
        if lora is not None:
            kwargs["lora_request"] = lora
        return self._engine.generate(*args, **kwargs)


class KvmeshVllmEngineServicer(VllmEngineServicer):
    def __init__(self, engine: Any, start_time: float,
                 adapters: AdapterManager | None = None) -> None:
        super().__init__(engine, start_time)
        self.adapters = adapters
        self._lora_requests: dict[str, Any] = {}
        if adapters is not None:
            self.engine = _AdapterEngine(engine, self._lora_requests)
        self.kv_fanout: KvEventFanout | None = None
        if self._kv_events_config is not None:
            self.kv_fanout = KvEventFanout(self._relay, self._name_adapters)

    def _relay(self, context: Any) -> AsyncIterator[smg_common_pb2.KvEventBatch]:
        """The library's relay from the live end, for the fan-out's one subscription."""
        return super().SubscribeKvEvents(smg_common_pb2.SubscribeKvEventsRequest(), context)

    def _name_adapters(self, batch: smg_common_pb2.KvEventBatch) -> None:
        if self.adapters is not None:
            name_adapter_blocks(batch, self.adapters.name_of)

    def _scheduler_counts(self, engine_idx: int = 0) -> tuple[int, int, float] | None:
        counts = super()._scheduler_counts(engine_idx)
        if counts is None:
            return None
        if self.engine.output_processor.get_num_unfinished_requests() == 0:
            return (0, 0, counts[2])
        return counts

    async def GetServerInfo(
        self, request: vllm_engine_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.GetServerInfoResponse:
        info = await super().GetServerInfo(request, context)
        if not info.uptime_seconds:
            info.uptime_seconds = time.time() - self.start_time
        return info

    async def Generate(
        self, request: vllm_engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[vllm_engine_pb2.GenerateResponse, None]:
        name = adapter_of(context.invocation_metadata())
        if not name:
            async for response in super().Generate(request, context):
                yield response
            return
        if self.adapters is None:
            raise InvalidRequestError(
                f"LoRA adapter `{name}` requested, but this worker serves no LoRA adapters",
                param="model")
        handle = await self.adapters.acquire(name)
        self._lora_requests[request.request_id] = lora_request(
            handle.name, handle.lora_id, handle.path)
        try:
            async for response in super().Generate(request, context):
                yield response
        finally:
            self._lora_requests.pop(request.request_id, None)
            self.adapters.release(name)

    async def SubscribeKvEvents(
        self, request: smg_common_pb2.SubscribeKvEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[smg_common_pb2.KvEventBatch]:
        if self.kv_fanout is None:  # no KV events configured: the library says so
            async for batch in super().SubscribeKvEvents(request, context):
                yield batch
            return
        batches = self.kv_fanout.subscribe(request.start_sequence_number)
        if request.load_records_before_first_batch:
            batches = with_early_heartbeats(
                batches, lambda: early_heartbeat(self._load_record(None)),
                HEARTBEAT_INTERVAL)  # the relay's own, once its first batch went out
        try:
            async for batch in batches:
                yield batch
        except RelayEnded as exc:
            await context.abort(exc.code, exc.details)
