"""kvmesh.v1.Router: protobuf ⇄ the router core (thin shell).

Each RPC unpacks its request, calls ``RouterCore`` (decisions, bookkeeping) or
``WorkerLifecycle`` (registration), and packs the answer; errors are the core's typed
errors, mapped to gRPC status by the shared interceptor. The RPCs that change the
worker set demand the mesh's internal token (``kvmesh.core.internal_auth``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence

import grpc
import numpy as np

from kvmesh.core.error_map import grpc_code_for, rich_status
from kvmesh.core.errors import InvalidRequestError, KvmeshError
from kvmesh.core.internal_auth import check_internal_token
from kvmesh.core.logs import request_id_var
from kvmesh.core.roles import GATEWAY, role_to_proto
from kvmesh.router.admission import AdmissionDeferred
from kvmesh.router.core import RouteQuery, RouterCore, WorkerStatus
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.pd import PdDecision
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.registry import WorkerState
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


_PACKED = np.dtype("<u4")  # packed_token_ids: little-endian uint32s


def unpack_tokens(packed: bytes, listed: Sequence[int]) -> np.ndarray:
    if packed:
        if len(packed) % 4:
            raise InvalidRequestError("packed_token_ids must hold uint32s",
                                      param="packed_token_ids")
        return np.frombuffer(packed, dtype=_PACKED)
    return np.array(listed, dtype=np.uint32)


def worker_to_proto(w: WorkerState) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=w.worker_id,
        endpoint=w.endpoint,
        model=w.model,
        adapters=list(w.adapters),
        servable_adapters=list(w.servable_adapters),
        lora_slots=w.lora_slots,
        role=role_to_proto(w.role),
        block_size=w.block_size,
        nixl_side_channel=w.nixl_side_channel,
        dp_rank=w.dp_rank,
        dp_group=w.dp_group,
        dp_size=w.dp_size,
        metrics_endpoint=w.metrics_endpoint,
        kv_connector=w.kv_connector,
        http_endpoint=w.http_endpoint,
        max_context_length=w.max_context_length,
        kv_capacity_tokens=w.kv_capacity_tokens,
        self_registered=w.self_registered,
        draining=w.draining,
        routing_policy=w.policy,
    )


def status_to_proto(status: WorkerStatus) -> router_pb2.WorkerStatus:
    w = status.worker
    return router_pb2.WorkerStatus(
        worker=worker_to_proto(w),
        load=common_pb2.WorkerLoad(
            num_running=w.load.num_running,
            num_waiting=w.load.num_waiting,
            kv_usage=w.load.kv_usage,
            in_flight=len(w.in_flight),
            age_s=status.load_age_s,
            cache_hit_rate=w.load.cache_hit_rate or 0.0,
        ),
        last_seen_age_s=status.last_seen_age_s,
        indexed_blocks=status.indexed_blocks,
        unreachable=w.unreachable,
    )


def fill_result(result: router_pb2.RouteBatchResult,
                failure: AdmissionDeferred | KvmeshError) -> None:
    """One failed request of a RouteBatch, as Route would have failed it (``deferred``
    for a request that would wait for a worker slot)."""
    if isinstance(failure, AdmissionDeferred):
        result.deferred = True
    else:
        result.code = grpc_code_for(failure).value[0]
        result.message = failure.message
        result.status_details = rich_status(failure).SerializeToString()
        result.param = failure.param or ""


async def outcome(choice: Awaitable[PdDecision]
                  ) -> PdDecision | AdmissionDeferred | KvmeshError:
    """A decision, or the kvmesh error (or deferral) it failed with."""
    try:
        return await choice
    except (AdmissionDeferred, KvmeshError) as exc:
        return exc


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore, lifecycle: WorkerLifecycle) -> None:
        self.core = core
        self.lifecycle = lifecycle
        self._infos: dict[str, tuple[WorkerState, common_pb2.WorkerInfo]] = {}
        #: host:port of this router's /metrics, told to gateways for service discovery.
        self.metrics_endpoint = ""

    def _authorize(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        check_internal_token(
            context.invocation_metadata(), self.core.config.security.internal_token, rpc)

    async def RegisterWorker(
        self, request: router_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RegisterWorkerResponse:
        self._authorize(context, "RegisterWorker")
        try:
            state = await self.lifecycle.register(request.worker)
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"worker {request.worker.endpoint} did not answer: {exc.details()}",
            )
        config = self.core.config
        return router_pb2.RegisterWorkerResponse(
            worker=worker_to_proto(state),
            heartbeat_interval_s=config.heartbeat_interval_s,
            lease_ttl_s=config.lease_ttl_s,
        )

    async def Heartbeat(
        self, request: router_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.HeartbeatResponse:
        self._authorize(context, "Heartbeat")
        known, changed = self.core.heartbeat(
            request.worker_id, request.adapters, request.servable_adapters)
        if changed:
            await self.core.notify()
        return router_pb2.HeartbeatResponse(known=known)

    async def DeregisterWorker(
        self, request: router_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DeregisterWorkerResponse:
        self._authorize(context, "DeregisterWorker")
        removed = await self.lifecycle.deregister(request.worker_id)
        return router_pb2.DeregisterWorkerResponse(removed=removed)

    async def DrainWorker(
        self, request: router_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DrainWorkerResponse:
        self._authorize(context, "DrainWorker")
        known, in_flight = await self.core.drain_worker(request.worker_id)
        if known:
            log.info("worker %s draining (%d routed requests in flight)", request.worker_id,
                     in_flight)
        return router_pb2.DrainWorkerResponse(known=known, in_flight=in_flight)

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteDecision:
        await self._refuse_while_warming(context)
        return await self._route(request, context.time_remaining())

    async def _refuse_while_warming(self, context: grpc.aio.ServicerContext) -> None:
        why = self.lifecycle.warming()
        if why:  # not a kvmesh error (no details): the gateway asks another replica
            await context.abort(grpc.StatusCode.UNAVAILABLE, why)

    async def _route(self, request: router_pb2.RouteRequest, time_remaining_s: float | None
                     ) -> router_pb2.RouteDecision:
        decision = router_pb2.RouteDecision()
        self._fill(decision, await self._choose(request, time_remaining_s),
                   request.model)
        return decision

    async def _choose(self, request: router_pb2.RouteRequest, time_remaining_s: float | None,
                      defer_wait: bool = False) -> PdDecision:
        request_id_var.set(request.request_id)  # this RPC's task: its log lines carry it
        ctx = RouteContext(
            request_id=request.request_id,
            model=request.model,
            adapter=request.adapter,
            token_ids=unpack_tokens(request.packed_token_ids, request.token_ids),
            max_tokens=request.max_tokens,
        )
        return await self.core.route(RouteQuery(
            ctx, request.exclude_worker_ids, time_remaining_s,
            preview=request.preview, prefer=request.prefer_worker_id, defer_wait=defer_wait))

    def _fill(self, out: router_pb2.RouteDecision, choice: PdDecision, model: str) -> None:
        """The decision's message, written in place (into a batch's result it is one
        message less to build and copy per request)."""
        if choice.prefill_worker is not None:
            out.mode = router_pb2.RouteDecision.MODE_DISAGGREGATED
            out.prefill_worker.CopyFrom(self._info(choice.prefill_worker))
        else:
            out.mode = router_pb2.RouteDecision.MODE_AGGREGATED
        out.worker.CopyFrom(self._info(choice.worker))
        out.expected_cached_tokens = choice.expected_cached_tokens
        out.reason = choice.reason
        out.policy = self.core.policy_for(model).name

    def _info(self, w: WorkerState) -> common_pb2.WorkerInfo:
        """The worker's WorkerInfo, built once per registration (the same
        WorkerState object) instead of once per decision."""
        cached = self._infos.get(w.worker_id)
        if cached is None or cached[0] is not w:
            cached = self._infos[w.worker_id] = (w, worker_to_proto(w))
        return cached[1]

    async def RouteBatch(
        self, request: router_pb2.RouteBatchRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteBatchResponse:
        self._finish(request)
        await self._refuse_while_warming(context)
        return await self._batch(request.requests, context.time_remaining(),
                                 request.defer_waits)

    async def RouteStream(  # type: ignore[override]
        self, requests: AsyncIterator[router_pb2.RouteBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[router_pb2.RouteBatchResponse]:
        async for request in requests:
            self._finish(request)
            why = self.lifecycle.warming()
            if why:  # as RouteBatch's abort: no details, the gateway asks another replica
                failed = router_pb2.RouteBatchResult(
                    code=grpc.StatusCode.UNAVAILABLE.value[0], message=why)
                answer = router_pb2.RouteBatchResponse(
                    results=[failed] * len(request.requests))
            else:  # answered at once: a request that would wait for a slot is deferred
                answer = await self._batch(request.requests, request.timeout_s or None,
                                           defer=True)
            answer.batch_id = request.batch_id
            yield answer

    def _finish(self, request: router_pb2.RouteBatchRequest) -> None:
        """A batch's finished reports, applied before its routes (either transport)."""
        for done in request.finished:
            self.core.finish(done.worker_id, done.request_id)

    async def _batch(self, requests: Sequence[router_pb2.RouteRequest],
                     remaining: float | None, defer: bool) -> router_pb2.RouteBatchResponse:
        self.core.metrics.route_batch_size.observe(len(requests))
        answer = router_pb2.RouteBatchResponse()
        if len(requests) == 1 or defer or self.core.config.max_inflight_per_worker <= 0:
            # No request can wait for a slot here: one after the other, no task each.
            outcomes = [await outcome(self._choose(r, remaining, defer)) for r in requests]
        else:
            outcomes = await asyncio.gather(
                *(outcome(self._choose(r, remaining, defer)) for r in requests))
        for request, done in zip(requests, outcomes, strict=True):
            result = answer.results.add()
            if isinstance(done, AdmissionDeferred | KvmeshError):
                fill_result(result, done)
            else:
                self._fill(result.decision, done, request.model)
        return answer

    async def RequestFinished(
        self, request: router_pb2.RequestFinishedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RequestFinishedResponse:
        self.core.finish(request.worker_id, request.request_id)
        if request.worker_failed:
            await self.lifecycle.suspect(request.worker_id)
        return router_pb2.RequestFinishedResponse()

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        statuses = [status_to_proto(s) for s in self.core.statuses(request.model)]
        pools = [router_pb2.PoolStatus(model=p.model, role=p.role,
                                       workers=len(self.core.workers_in(p.model, p.role)),
                                       desired=p.desired or 0, need=p.need)
                 for p in self.core.scalers.values()
                 if not request.model or p.model == request.model]
        return router_pb2.ListWorkersResponse(workers=statuses, policy=self.core.policy.name,
                                              pools=pools)

    async def WatchWorkers(  # type: ignore[override]
        self, request: router_pb2.WatchWorkersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.WorkerSet]:
        # A partial (or, just started, an empty) set would drop models from gateways.
        while self.lifecycle.warming():
            await asyncio.sleep(0.05)
        sent = -1
        while True:
            sent, registered = await self.core.next_worker_set(sent)
            yield router_pb2.WorkerSet(
                workers=[worker_to_proto(w) for w in registered if w.role != GATEWAY],
                gateways=[worker_to_proto(w) for w in registered if w.role == GATEWAY],
                version=sent, router_metrics_endpoint=self.metrics_endpoint,
                unreachable_worker_ids=[w.worker_id for w in registered if w.unreachable])
