"""The gateway's view of the mesh: ask the router, stream from the chosen worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextvars import ContextVar

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.core.grpc_util import insecure_channel
from kvmesh.core.lora_config import ADAPTER_METADATA_KEY
from kvmesh.gateway.pd import (
    PdMetrics,
    generate_request,
    handoff,
    pd_fallback_reason,
    prefill_request,
)
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

#: A request that failed before its first token (worker gone) is routed again.
MAX_ATTEMPTS = 3

#: Set by the edge's endpoint picker (kvmesh/gateway/picker.py): the worker it chose.
PREFERRED_WORKER_HEADER = "x-kvmesh-worker"
#: The worker an endpoint picker chose for the request being served (its
#: ``x-kvmesh-worker`` header): Route asks the router for it.
preferred_worker: ContextVar[str] = ContextVar("kvmesh_preferred_worker", default="")


class MeshClient:
    def __init__(
        self, router: str, route_timeout_s: float, request_timeout_s: float,
        prefill_timeout_s: float = 60.0, metrics: PdMetrics | None = None,
    ) -> None:
        self._router_channel = insecure_channel(router)
        self.router = router_pb2_grpc.RouterStub(self._router_channel)
        self._route_timeout_s = route_timeout_s
        self._request_timeout_s = request_timeout_s
        self._prefill_timeout_s = prefill_timeout_s
        self.pd_metrics = metrics or PdMetrics()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = insecure_channel(endpoint)
        return channel

    def worker(self, endpoint: str) -> vllm_engine_pb2_grpc.VllmEngineStub:
        return vllm_engine_pb2_grpc.VllmEngineStub(self._channel(endpoint))

    def lora_adapters(self, endpoint: str) -> worker_pb2_grpc.LoraAdaptersStub:
        """The worker's kvmesh.v1.LoraAdapters service (run-time adapter loads)."""
        return worker_pb2_grpc.LoraAdaptersStub(self._channel(endpoint))

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        max_tokens: int,
        exclude: Sequence[str] = (),
        adapter: str = "",
        preview: bool = False,
    ) -> router_pb2.RouteDecision:
        """The router's decision for one request; ``preview``: where it would go,
        nothing booked (the endpoint picker's question)."""
        return await self.router.Route(
            router_pb2.RouteRequest(
                request_id=request_id,
                model=model,
                adapter=adapter,
                packed_token_ids=np.asarray(token_ids, dtype="<u4").tobytes(),
                max_tokens=max_tokens,
                exclude_worker_ids=exclude,
                preview=preview,
                prefer_worker_id=preferred_worker.get(),
            ),
            timeout=self._route_timeout_s,
        )

    def _release(self, request_id: str, worker_id: str) -> None:
        """Tell the router the request is done, without making the client wait."""

        async def send() -> None:
            try:
                await self.router.RequestFinished(
                    router_pb2.RequestFinishedRequest(request_id=request_id, worker_id=worker_id),
                    timeout=self._route_timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                log.debug("RequestFinished %s failed: %s", request_id, exc.code().name)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(
        self,
        request_id: str,
        model: str,
        prompt_ids: Sequence[int],
        sampling: vllm_engine_pb2.SamplingParams,
        prompt_text: str = "",
        mm_inputs: vllm_engine_pb2.MultimodalInputs | None = None,
        adapter: str = "",
    ) -> AsyncGenerator[vllm_engine_pb2.GenerateResponse, None]:
        """Stream a generation; cancelling the consumer cancels the worker RPC(s).

        A disaggregated decision first prefills on the prefill worker; the client
        sees only the decode worker's stream. ``adapter`` (a LoRA adapter of
        ``model``) is routed on and named to the worker(s) in the call's metadata.
        """
        excluded: list[str] = []
        metadata = ((ADAPTER_METADATA_KEY, adapter),) if adapter else None
        # Spans are started and ended explicitly: this generator may be resumed from
        # another task than the one that created it, so nothing is attached across a yield.
        parent = otel_context.get_current()
        for attempt in range(MAX_ATTEMPTS):
            with tracer.start_as_current_span("route", context=parent) as route_span:
                decision = await self.route(
                    request_id, model, prompt_ids, sampling.max_tokens, excluded, adapter
                )
                route_span.set_attributes({
                    "kvmesh.worker": decision.worker.worker_id,
                    "kvmesh.route.reason": decision.reason,
                    "kvmesh.route.policy": decision.policy,
                    "kvmesh.route.expected_cached_tokens": decision.expected_cached_tokens,
                    "kvmesh.attempt": attempt,
                })
            worker = decision.worker
            log.debug("%s -> %s (%s)", request_id, worker.worker_id, decision.reason)
            call = None
            disaggregated = decision.mode == router_pb2.RouteDecision.MODE_DISAGGREGATED
            # Disaggregated: the decode leg starts by pulling the prompt's KV from the
            # prefill worker (NIXL), so its span runs to the first token through it.
            span = tracer.start_span(
                "decode" if disaggregated else "generate", context=parent,
                attributes={"kvmesh.worker": worker.worker_id,
                            "kvmesh.prompt_tokens": len(prompt_ids)})
            started = False
            try:
                handover = None
                if disaggregated:
                    self.pd_metrics.requests.labels("disaggregated").inc()
                    with tracer.start_as_current_span("prefill", context=parent, attributes={
                            "kvmesh.worker": decision.prefill_worker.worker_id}) as pspan:
                        handover = await self._prefill(
                            request_id, decision.prefill_worker, prompt_ids, prompt_text,
                            sampling, mm_inputs, metadata)
                        pspan.set_attribute("kvmesh.kv_handover", handover is not None)
                else:
                    self.pd_metrics.requests.labels("aggregated").inc()
                with trace.use_span(span, end_on_exit=False):
                    call = self.worker(worker.endpoint).Generate(
                        generate_request(request_id, prompt_ids, prompt_text, sampling,
                                         handover, mm_inputs),
                        timeout=self._request_timeout_s, metadata=metadata,
                    )
                async for response in call:
                    if not started:
                        span.add_event("first_token")
                    started = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                span.set_status(trace.StatusCode.ERROR, exc.code().name)
                retry = (
                    exc.code() == grpc.StatusCode.UNAVAILABLE
                    and not started
                    and attempt + 1 < MAX_ATTEMPTS
                )
                if not retry:
                    raise
                log.warning("%s: worker %s unavailable, routing again", request_id,
                            worker.worker_id)
                excluded.append(worker.worker_id)
            finally:
                # No-op when the call finished; otherwise the worker aborts the request
                # (a decode worker also tells the prefill worker to free its blocks).
                if call is not None:
                    call.cancel()
                span.end()
                self._release(request_id, worker.worker_id)

    async def _prefill(
        self,
        request_id: str,
        prefill: common_pb2.WorkerInfo,
        prompt_ids: Sequence[int],
        prompt_text: str,
        sampling: vllm_engine_pb2.SamplingParams,
        mm_inputs: vllm_engine_pb2.MultimodalInputs | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> str | None:
        """Run the prefill leg; return the decode worker's hand-over, or None to make
        the decode worker prefill locally (counted: never a failed or hung request)."""
        local = pd_fallback_reason(sampling)
        if local is not None:
            self.pd_metrics.fallbacks.labels(local).inc()
            self._release(request_id, prefill.worker_id)
            return None
        started = time.monotonic()
        call = self.worker(prefill.endpoint).Generate(
            prefill_request(request_id, prompt_ids, prompt_text, sampling, mm_inputs),
            timeout=min(self._prefill_timeout_s, self._request_timeout_s), metadata=metadata,
        )
        reason = "no_handoff"
        handover: str | None = None
        try:
            # Read to the end of the stream (the hand-over rides on the last message):
            # leaving mid-stream would leave the RPC, and its client span, to the GC.
            async for response in call:
                handover = handover or handoff(response)
            if handover is not None:
                return handover
        except grpc.aio.AioRpcError as exc:
            reason = (
                "prefill_timeout" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else "prefill_failed"
            )
            log.warning("%s: prefill on %s failed (%s: %s); prefilling on the decode worker",
                        request_id, prefill.worker_id, exc.code().name, exc.details())
        finally:
            # Cancelled mid-prefill (client gone): the prefill worker aborts the request
            # and frees its blocks. After a finished stream this is a no-op.
            call.cancel()
            self._release(request_id, prefill.worker_id)
            self.pd_metrics.prefill_seconds.inc(time.monotonic() - started)
        self.pd_metrics.fallbacks.labels(reason).inc()
        if reason == "no_handoff":
            log.warning("%s: prefill worker %s handed no KV over; prefilling on the decode "
                        "worker", request_id, prefill.worker_id)
        return None

    async def embed(
        self, request_id: str, model: str, token_ids: Sequence[int], text: str = ""
    ) -> vllm_engine_pb2.EmbedResponse:
        """One input through a worker's pooling engine (``VllmEngine.Embed``)."""
        excluded: list[str] = []
        for attempt in range(MAX_ATTEMPTS):
            decision = await self.route(request_id, model, token_ids, 0, excluded)
            worker = decision.worker
            log.debug("%s -> %s (%s)", request_id, worker.worker_id, decision.reason)
            try:
                response: vllm_engine_pb2.EmbedResponse = await self.worker(
                    worker.endpoint
                ).Embed(
                    vllm_engine_pb2.EmbedRequest(
                        request_id=request_id,
                        tokenized=vllm_engine_pb2.TokenizedInput(
                            input_ids=token_ids, original_text=text
                        ),
                    ),
                    timeout=self._request_timeout_s,
                )
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 >= MAX_ATTEMPTS:
                    raise
                log.warning("%s: worker %s unavailable, routing again", request_id,
                            worker.worker_id)
                excluded.append(worker.worker_id)
            finally:
                self._release(request_id, worker.worker_id)
                if decision.mode == router_pb2.RouteDecision.MODE_DISAGGREGATED:
                    # Pooling runs in one pass: a prefill leg has nothing to hand over.
                    self._release(request_id, decision.prefill_worker.worker_id)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def close(self) -> None:
        for task in list(self._background):
            await asyncio.wait([task], timeout=1.0)
        for channel in self._channels.values():
            await channel.close()
        await self._router_channel.close()
