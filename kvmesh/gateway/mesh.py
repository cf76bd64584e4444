"""The gateway's view of the mesh: ask the router, stream from the chosen worker, and
fail over when a worker is lost (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.core.errors import KvmeshError, NoWorkerAvailableError
from kvmesh.core.grpc_util import internal_channel
from kvmesh.core.lora_config import ADAPTER_METADATA_KEY
from kvmesh.core.resilience_config import FailoverConfig, OutlierConfig
from kvmesh.gateway.outlier import OutlierDetector
from kvmesh.gateway.pd import (
    PdMetrics,
    generate_request,
    handoff,
    pd_fallback_reason,
    prefill_request,
)
from kvmesh.gateway.resume import (
    as_original,
    budget_spent,
    continuation,
    length_complete,
    resume_refusal,
)
from kvmesh.gateway.router_client import Routed, RouterClient, replica_failed
from kvmesh.v1 import common_pb2, router_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)



#: Worker status codes that count against it (outlier detection) and, for a stream,
#: mean it was lost (connection refused or reset: a dead process), so the request is
#: retried (or resumed) on another worker. A client's own errors never count.
_WORKER_FAILURES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED,
})
_WORKER_LOST = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                          grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


class MeshClient:
    def __init__(
        self, routers: RouterClient, request_timeout_s: float,
        prefill_timeout_s: float = 60.0, metrics: PdMetrics | None = None,
        failover: FailoverConfig | None = None, outlier: OutlierConfig | None = None,
    ) -> None:
        self.routers = routers
        self.metrics = routers.metrics
        self._request_timeout_s = request_timeout_s
        self._prefill_timeout_s = prefill_timeout_s
        self.pd_metrics = metrics or PdMetrics()
        self.failover_config = failover or FailoverConfig()
        self.outliers = OutlierDetector(outlier or OutlierConfig())
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = internal_channel(endpoint)
        return channel

    def worker(self, endpoint: str) -> vllm_engine_pb2_grpc.VllmEngineStub:
        return vllm_engine_pb2_grpc.VllmEngineStub(self._channel(endpoint))

    def lora_adapters(self, endpoint: str) -> worker_pb2_grpc.LoraAdaptersStub:
        """The worker's kvmesh.v1.LoraAdapters service (run-time adapter loads)."""
        return worker_pb2_grpc.LoraAdaptersStub(self._channel(endpoint))

    async def route(self, request_id: str, model: str, token_ids: Sequence[int],
                    max_tokens: int, exclude: Sequence[str] = (), adapter: str = "",
                    preview: bool = False) -> Routed:
        """A decision from a router replica (or the gateway's own), avoiding ``exclude``
        and the workers the outlier detection ejected, for ``adapter`` (a LoRA adapter
        of ``model``) when given; ``preview``: where it would go, nothing booked (the
        endpoint picker's question)."""
        ejected = [w for w in self.outliers.ejected() if w not in exclude]
        if not ejected:
            return await self.routers.route(request_id, model, token_ids, max_tokens, exclude,
                                            preview, adapter)
        try:
            return await self.routers.route(request_id, model, token_ids, max_tokens,
                                            [*exclude, *ejected], preview, adapter)
        except (grpc.aio.AioRpcError, NoWorkerAvailableError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and (
                    exc.code() != grpc.StatusCode.UNAVAILABLE or replica_failed(exc)):
                raise
            # Only ejected workers are left (Envoy's panic mode): better them than none.
            log.warning("%s: every worker left is ejected; routing to them anyway",
                        request_id)
            return await self.routers.route(request_id, model, token_ids, max_tokens, exclude,
                                            preview, adapter)

    def _release(self, request_id: str, worker_id: str, router: str | None = None,
                 lost: bool = False) -> None:
        """Tell the router the request is done (and whether the worker was lost),
        without making the client wait."""
        task = asyncio.get_running_loop().create_task(
            self.routers.finished(request_id, worker_id, router, lost))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def failover_threshold(self) -> int:
        return self.outliers.config.consecutive_failures

    def _outcome(self, worker_id: str, exc: grpc.aio.AioRpcError | None) -> None:
        if exc is None or exc.code() not in _WORKER_FAILURES:
            self.outliers.success(worker_id)
            return
        known = len(self.routers.known_workers())
        if self.outliers.failure(worker_id, known):
            self.metrics.ejections.labels(worker_id).inc()
            log.warning("worker %s ejected for %.1fs after %d failures in a row (last: %s)",
                        worker_id, self.outliers.ejection_s(worker_id),
                        self.failover_threshold, exc.code().name)

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
        sees only the decode worker's stream. A worker lost before its first token is
        replaced; one lost after it is replaced by a continuation (``resume``) whose
        stream is spliced on, so the client sees one stream. ``adapter`` (a LoRA adapter
        of ``model``) is routed on and named to the worker(s) in the call's metadata.
        """
        excluded: list[str] = []
        metadata = ((ADAPTER_METADATA_KEY, adapter),) if adapter else None
        sent: list[int] = []  # tokens of the (single) choice already yielded
        started = False
        # Spans are started and ended explicitly: this generator may be resumed from
        # another task than the one that created it, so nothing is attached across a yield.
        parent = otel_context.get_current()
        attempts = self.failover_config.max_attempts
        for attempt in range(attempts):
            ids, params = (prompt_ids, sampling) if not started else continuation(
                prompt_ids, sent, sampling)
            resumed_from = len(sent) if started else 0
            with tracer.start_as_current_span("route", context=parent) as route_span:
                try:
                    routed = await self.route(request_id, model, ids, params.max_tokens,
                                              excluded, adapter)
                except (grpc.aio.AioRpcError, KvmeshError):
                    self.metrics.failovers.labels("error").inc(started)
                    raise
                decision = routed.decision
                route_span.set_attributes({
                    "kvmesh.worker": decision.worker.worker_id,
                    "kvmesh.route.reason": decision.reason,
                    "kvmesh.route.policy": decision.policy,
                    "kvmesh.route.expected_cached_tokens": decision.expected_cached_tokens,
                    "kvmesh.attempt": attempt,
                    "kvmesh.resumed_tokens": resumed_from,
                })
            worker = decision.worker
            log.debug("%s -> %s (%s)", request_id, worker.worker_id, decision.reason)
            call = None
            lost = False
            disaggregated = decision.mode == router_pb2.RouteDecision.MODE_DISAGGREGATED
            # Disaggregated: the decode leg starts by pulling the prompt's KV from the
            # prefill worker (NIXL), so its span runs to the first token through it.
            span = tracer.start_span(
                "decode" if disaggregated else "generate", context=parent,
                attributes={"kvmesh.worker": worker.worker_id,
                            "kvmesh.prompt_tokens": len(ids)})
            self.routers.local.started(worker.worker_id)
            try:
                handover = None
                if disaggregated:
                    self.pd_metrics.requests.labels("disaggregated").inc()
                    with tracer.start_as_current_span("prefill", context=parent, attributes={
                            "kvmesh.worker": decision.prefill_worker.worker_id}) as pspan:
                        handover = await self._prefill(
                            request_id, decision.prefill_worker, ids,
                            "" if started else prompt_text, params, mm_inputs, routed.router,
                            metadata)
                        pspan.set_attribute("kvmesh.kv_handover", handover is not None)
                else:
                    self.pd_metrics.requests.labels("aggregated").inc()
                with trace.use_span(span, end_on_exit=False):
                    call = self.worker(worker.endpoint).Generate(
                        generate_request(request_id, ids, "" if started else prompt_text,
                                         params, handover, mm_inputs),
                        timeout=self._request_timeout_s, metadata=metadata,
                    )
                async for response in call:
                    if not started:
                        span.add_event("first_token")
                    started = True
                    if resumed_from:
                        response = as_original(response, len(prompt_ids), resumed_from)
                    if response.WhichOneof("response") == "chunk":
                        sent.extend(response.chunk.token_ids)
                    yield response
                self._outcome(worker.worker_id, None)
                if resumed_from:
                    self.metrics.failovers.labels("resumed").inc()
                return
            except grpc.aio.AioRpcError as exc:
                span.set_status(trace.StatusCode.ERROR, exc.code().name)
                self._outcome(worker.worker_id, exc)
                lost = exc.code() in _WORKER_LOST
                if not lost or attempt + 1 >= attempts:
                    if lost and started:
                        self.metrics.failovers.labels("error").inc()
                        raise NoWorkerAvailableError(
                            f"worker {worker.worker_id} was lost mid-stream after "
                            f"{len(sent)} tokens and no worker was left to resume on "
                            f"({attempts} attempts)") from exc
                    raise
                if started:
                    refusal = resume_refusal(sampling) if \
                        self.failover_config.resume_mid_stream else "resuming is turned off"
                    if refusal is not None:
                        self.metrics.failovers.labels("error").inc()
                        raise NoWorkerAvailableError(
                            f"worker {worker.worker_id} was lost mid-stream after "
                            f"{len(sent)} tokens; this request cannot be resumed on another "
                            f"worker: {refusal}") from exc
                    if budget_spent(len(sent), sampling):
                        yield length_complete(len(prompt_ids), len(sent))
                        return
                if not started:
                    self.metrics.retries.inc()
                log.warning("%s: worker %s lost (%s) %s", request_id, worker.worker_id,
                            exc.code().name, f"after {len(sent)} tokens; resuming on another"
                            if started else "before its first token; routing again")
                excluded.append(worker.worker_id)
            finally:
                # No-op when the call finished; otherwise the worker aborts the request
                # (a decode worker also tells the prefill worker to free its blocks).
                if call is not None:
                    call.cancel()
                span.end()
                self.routers.local.finished(worker.worker_id)
                self._release(request_id, worker.worker_id, routed.router, lost)

    async def _prefill(
        self,
        request_id: str,
        prefill: common_pb2.WorkerInfo,
        prompt_ids: Sequence[int],
        prompt_text: str,
        sampling: vllm_engine_pb2.SamplingParams,
        mm_inputs: vllm_engine_pb2.MultimodalInputs | None = None,
        router: str | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> str | None:
        """Run the prefill leg; return the decode worker's hand-over, or None to make
        the decode worker prefill locally (counted: never a failed or hung request)."""
        local = pd_fallback_reason(sampling)
        if local is not None:
            self.pd_metrics.fallbacks.labels(local).inc()
            self._release(request_id, prefill.worker_id, router)
            return None
        started = time.monotonic()
        call = self.worker(prefill.endpoint).Generate(
            prefill_request(request_id, prompt_ids, prompt_text, sampling, mm_inputs),
            timeout=min(self._prefill_timeout_s, self._request_timeout_s), metadata=metadata,
        )
        reason = "no_handoff"
        handover: str | None = None
        failure: grpc.aio.AioRpcError | None = None
        try:
            # Read to the end of the stream (the hand-over rides on the last message):
            # leaving mid-stream would leave the RPC, and its client span, to the GC.
            async for response in call:
                handover = handover or handoff(response)
            if handover is not None:
                return handover
        except grpc.aio.AioRpcError as exc:
            failure = exc
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
            lost = failure is not None and failure.code() in _WORKER_LOST
            self._release(request_id, prefill.worker_id, router, lost)
            if failure is not None or handover is not None:
                self._outcome(prefill.worker_id, failure)
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
        attempts = self.failover_config.max_attempts
        for attempt in range(attempts):
            routed = await self.route(request_id, model, token_ids, 0, excluded)
            decision = routed.decision
            worker = decision.worker
            log.debug("%s -> %s (%s)", request_id, worker.worker_id, decision.reason)
            lost = False
            self.routers.local.started(worker.worker_id)
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
                self._outcome(worker.worker_id, None)
                return response
            except grpc.aio.AioRpcError as exc:
                self._outcome(worker.worker_id, exc)
                lost = exc.code() in _WORKER_LOST
                if not lost or attempt + 1 >= attempts:
                    raise
                log.warning("%s: worker %s lost (%s), routing again", request_id,
                            worker.worker_id, exc.code().name)
                excluded.append(worker.worker_id)
            finally:
                self.routers.local.finished(worker.worker_id)
                self._release(request_id, worker.worker_id, routed.router, lost)
                if decision.mode == router_pb2.RouteDecision.MODE_DISAGGREGATED:
                    # Pooling runs in one pass: a prefill leg has nothing to hand over.
                    self._release(request_id, decision.prefill_worker.worker_id, routed.router)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def close(self) -> None:
        for task in list(self._background):
            await asyncio.wait([task], timeout=1.0)
        for channel in self._channels.values():
            await channel.close()
        await self.routers.close()
