"""kvmesh.v1.Router over the pure registry and policies (thin shell)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from opentelemetry import trace
from smg_grpc_proto.generated import common_pb2 as smg_common_pb2

from kvmesh.core.config import RouterConfig
from kvmesh.core.errors import InvalidRequestError, ModelNotFoundError, RateLimitedError
from kvmesh.core.grpc_util import insecure_channel
from kvmesh.core.logs import request_id_var
from kvmesh.core.roles import role_from_proto, role_to_proto
from kvmesh.router import snapshot, worker_probe
from kvmesh.router.admission import Admission, AdmissionTimeout
from kvmesh.router.cost_model import CostParams
from kvmesh.router.kv_events import KvEventFollower
from kvmesh.router.metrics import RouterMetrics, WorkerSample
from kvmesh.router.pd import decide
from kvmesh.router.policies import KvAwarePolicy, RouteContext, make_policy
from kvmesh.router.prefix_index import PrefixIndex, pack_views
from kvmesh.router.registry import WorkerRegistry, WorkerState
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

#: Seconds of the Route caller's deadline kept for answering "busy" before it expires.
ADMISSION_DEADLINE_MARGIN_S = 0.5



def unpack_tokens(packed: bytes, listed: Sequence[int]) -> np.ndarray:
    if packed:
        if len(packed) % 4:
            raise InvalidRequestError("packed_token_ids must hold uint32s",
                                      param="packed_token_ids")
        return np.frombuffer(packed, dtype="<u4")
    return np.array(listed, dtype=np.uint32)


def worker_to_proto(w: WorkerState) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=w.worker_id,
        endpoint=w.endpoint,
        model=w.model,
        adapters=list(w.adapters),
        role=role_to_proto(w.role),
        block_size=w.block_size,
        nixl_side_channel=w.nixl_side_channel,
        dp_rank=w.dp_rank,
        metrics_endpoint=w.metrics_endpoint,
        kv_connector=w.kv_connector,
        max_context_length=w.max_context_length,
        kv_capacity_tokens=w.kv_capacity_tokens,
        self_registered=w.self_registered,
    )


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self._config = config
        self.metrics = metrics or RouterMetrics()
        self.registry = WorkerRegistry(config.lease_ttl_s)
        self.index = PrefixIndex()
        self.cost_params = CostParams()
        self.policy = make_policy(config.policy, config.seed, self.index, self.cost_params)
        self._rng = random.Random(config.seed)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._watchers: dict[str, list[asyncio.Task[None]]] = {}
        self.followers: dict[str, KvEventFollower] = {}
        self._incarnations: dict[str, float] = {}
        self._restorable: dict[str, snapshot.WorkerSnapshot] = {}
        fresh_s = 2 * max(config.heartbeat_interval_s, config.probe_interval_s)
        self.metrics.track(
            lambda: len(self.index),
            lambda: [
                WorkerSample(w.worker_id, w.role, self.registry.state_of(w, fresh_s),
                             w.load.num_running, w.load.num_waiting, len(w.in_flight),
                             w.load.kv_usage, w.load.cache_hit_rate,
                             self.index.blocks(w.worker_id))
                for w in self.registry.all()
            ],
        )
        self._changed = asyncio.Condition()
        self._admission: dict[str, Admission] = {}
        #: host:port of this router's /metrics, told to gateways for service discovery.
        self.metrics_endpoint = ""
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        path = self._config.snapshot_path
        if path is not None:
            self._restorable = await asyncio.to_thread(
                snapshot.read, path, self._config.snapshot_max_age_s)
            if self._restorable:
                log.info("snapshot %s holds views of %d worker(s); restored as they register",
                         path, len(self._restorable))
            self._tasks.append(asyncio.create_task(self._snapshot_loop(path)))
        self._tasks.append(asyncio.create_task(self._expire_loop()))
        for endpoint in self._config.static_workers:
            self._tasks.append(asyncio.create_task(self._register_static(endpoint)))

    async def take_snapshot(self, path: Path) -> None:
        views = self.index.export_views()  # copies, taken on the loop; the rest off it
        incarnations = dict(self._incarnations)

        def work() -> None:
            snapshot.write(path, snapshot.capture(pack_views(views), incarnations))

        await asyncio.to_thread(work)

    async def _snapshot_loop(self, path: Path) -> None:
        while True:
            await asyncio.sleep(self._config.snapshot_interval_s)
            try:
                await self.take_snapshot(path)
            except OSError as exc:
                log.warning("index snapshot to %s failed: %s", path, exc)

    async def stop(self) -> None:
        if self._config.snapshot_path is not None:
            with contextlib.suppress(OSError):
                await self.take_snapshot(self._config.snapshot_path)
        tasks = [*self._tasks, *(t for ts in self._watchers.values() for t in ts)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for channel in self._channels.values():
            await channel.close()

    async def _register_static(self, endpoint: str) -> None:
        """Keep trying to register a by-address worker until it answers."""
        request = router_pb2.RegisterWorkerRequest(
            worker=common_pb2.WorkerInfo(endpoint=endpoint, self_registered=False)
        )
        while True:
            try:
                await self._register(request.worker)
                return
            except grpc.aio.AioRpcError as exc:
                log.info("static worker %s not reachable yet: %s", endpoint, exc.code().name)
                await asyncio.sleep(self._config.probe_interval_s)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self._config.heartbeat_interval_s, 1.0))
            for worker_id in self.registry.expire():
                log.warning("worker %s expired (no heartbeat or probe)", worker_id)
                self._forget(worker_id)
                await self._notify()

    async def _notify(self) -> None:
        self._wake_admission()  # a worker joined or left: waiters look again
        async with self._changed:
            self._changed.notify_all()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = insecure_channel(endpoint)
        return channel

    def _stop_watching(self, worker_id: str) -> None:
        for task in self._watchers.pop(worker_id, []):
            task.cancel()
        self.followers.pop(worker_id, None)

    def _forget(self, worker_id: str) -> None:
        """A worker is gone: stop watching it and purge what it held from the index."""
        self._stop_watching(worker_id)
        self.index.remove_worker(worker_id)

    async def _probe_loop(self, worker_id: str, endpoint: str) -> None:
        """Poll GetLoads: it is both the load feed and the liveness probe."""
        channel = self._channel(endpoint)
        while True:
            try:
                sample = await worker_probe.sample_load(channel)
                self.registry.report_load(
                    worker_id, sample.num_running, sample.num_waiting, sample.kv_usage,
                    sample.waiting_uncached_tokens, sample.cache_hit_rate,
                )
                self._wake_admission()
            except grpc.aio.AioRpcError as exc:
                log.debug("probe of %s failed: %s", worker_id, exc.code().name)
            await asyncio.sleep(self._config.probe_interval_s)

    async def _register(self, info: common_pb2.WorkerInfo) -> WorkerState:
        if not info.endpoint:
            raise InvalidRequestError("worker.endpoint is required", param="worker.endpoint")
        facts = await worker_probe.describe(self._channel(info.endpoint))
        state = WorkerState(
            worker_id=info.worker_id or info.endpoint,
            endpoint=info.endpoint,
            model=info.model or facts.model,
            role=role_from_proto(info.role),
            adapters=tuple(info.adapters),
            block_size=info.block_size or facts.block_size,
            max_context_length=info.max_context_length or facts.max_context_length,
            kv_capacity_tokens=info.kv_capacity_tokens or facts.kv_capacity_tokens,
            metrics_endpoint=info.metrics_endpoint,
            nixl_side_channel=info.nixl_side_channel,
            kv_connector=info.kv_connector,
            dp_rank=info.dp_rank,
            self_registered=info.self_registered,
        )
        self.registry.upsert(state)
        self._stop_watching(state.worker_id)
        # A (re-)registered worker may have restarted: its old cache view is void,
        # unless a snapshot holds the view of this very incarnation of it.
        self.index.clear_worker(state.worker_id)
        self._incarnations[state.worker_id] = facts.incarnation
        saved = self._restorable.pop(state.worker_id, None)
        if saved is not None and snapshot.same_incarnation(saved.incarnation, facts.incarnation):
            restored = snapshot.restore(self.index, state.worker_id, saved)
            log.info("restored %d indexed blocks of %s from the snapshot", restored,
                     state.worker_id)
        worker_id = state.worker_id

        def on_load(load: smg_common_pb2.EngineLoad) -> None:
            # Pushed with every event batch and as a heartbeat: fresher than polling.
            # Prefill work in hand: the engine's pending prompt tokens when the
            # servicer reports them (running prefills included), else the waiting ones.
            pending = load.waiting_uncached_tokens
            if load.HasField("prefill_pending_tokens"):
                pending = max(pending, load.prefill_pending_tokens)
            self.registry.report_load(
                worker_id, load.running_requests, load.waiting_requests, load.token_usage,
                pending, load.cache_hit_rate if load.HasField("cache_hit_rate") else None,
            )
            self._wake_admission()

        follower = KvEventFollower(
            worker_id, self._channel(state.endpoint), self.index, state.model,
            state.block_size, on_load=on_load, metrics=self.metrics,
        )
        self.followers[state.worker_id] = follower
        self._watchers[state.worker_id] = [
            asyncio.create_task(self._probe_loop(state.worker_id, state.endpoint)),
            asyncio.create_task(follower.run()),
        ]
        log.info(
            "registered worker %s at %s (model=%s role=%s block_size=%d%s)",
            state.worker_id, state.endpoint, state.model, state.role, state.block_size,
            f" {state.kv_connector} side channel {state.nixl_side_channel}"
            if state.kv_connector else "",
        )
        await self._notify()
        return state

    # ---- RPCs ------------------------------------------------------------------
    async def RegisterWorker(
        self, request: router_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RegisterWorkerResponse:
        try:
            state = await self._register(request.worker)
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"worker {request.worker.endpoint} did not answer: {exc.details()}",
            )
        return router_pb2.RegisterWorkerResponse(
            worker=worker_to_proto(state),
            heartbeat_interval_s=self._config.heartbeat_interval_s,
            lease_ttl_s=self._config.lease_ttl_s,
        )

    async def Heartbeat(
        self, request: router_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.HeartbeatResponse:
        return router_pb2.HeartbeatResponse(known=self.registry.touch(request.worker_id))

    async def DeregisterWorker(
        self, request: router_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DeregisterWorkerResponse:
        removed = self.registry.remove(request.worker_id)
        self._forget(request.worker_id)
        if removed:
            log.info("worker %s deregistered", request.worker_id)
            await self._notify()
        return router_pb2.DeregisterWorkerResponse(removed=removed)

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteDecision:
        request_id_var.set(request.request_id)  # this RPC's task: its log lines carry it
        if request.model not in self.registry.models():
            raise ModelNotFoundError(f"the model `{request.model}` does not exist", param="model")
        ctx = RouteContext(
            request_id=request.request_id,
            model=request.model,
            adapter=request.adapter,
            token_ids=unpack_tokens(request.packed_token_ids, request.token_ids),
            max_tokens=request.max_tokens,
        )
        exclude = request.exclude_worker_ids
        workers = await self._admit(request, context)
        prefill = self.registry.candidates(
            request.model, request.adapter, exclude, roles=("prefill",))
        decode = [w for w in workers if w.role == "decode"]
        started = time.perf_counter()
        with tracer.start_as_current_span("decide") as span:
            choice = decide(self.policy, ctx, workers, prefill, decode,
                            self._config.disaggregation, self.cost_params, self._rng)
            span.set_attributes({
                "kvmesh.route.policy": self.policy.name,
                "kvmesh.route.reason": choice.reason,
                "kvmesh.worker": choice.worker.worker_id,
                "kvmesh.route.expected_cached_tokens": choice.expected_cached_tokens,
                "kvmesh.route.candidates": len(workers),
                "kvmesh.route.disaggregated": choice.prefill_worker is not None,
            })
        self.metrics.decision_seconds.labels(self.policy.name).observe(
            time.perf_counter() - started)
        self.metrics.decisions.labels(self.policy.name, choice.reason).inc()
        self.metrics.matched_prefix_tokens.observe(choice.expected_cached_tokens)
        uncached = max(len(ctx.token_ids) - choice.expected_cached_tokens, 0)
        if choice.prefill_worker is not None:
            self.registry.routed(choice.prefill_worker.worker_id, request.request_id, uncached)
            self.registry.routed(choice.worker.worker_id, request.request_id, 0)
        else:
            self.registry.routed(choice.worker.worker_id, request.request_id, uncached)
        log.debug("route %s -> %s%s (%s)", request.request_id, choice.worker.worker_id,
                  f" after prefill on {choice.prefill_worker.worker_id}"
                  if choice.prefill_worker else "", choice.reason)
        return router_pb2.RouteDecision(
            mode=router_pb2.RouteDecision.MODE_DISAGGREGATED if choice.disaggregated
            else router_pb2.RouteDecision.MODE_AGGREGATED,
            worker=worker_to_proto(choice.worker),
            prefill_worker=worker_to_proto(choice.prefill_worker)
            if choice.prefill_worker else None,
            expected_cached_tokens=choice.expected_cached_tokens,
            reason=choice.reason,
            policy=self.policy.name,
        )

    async def _admit(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> list[WorkerState]:
        """The candidate workers with a free slot; waits at the router while every
        one is full (``max_inflight_per_worker``), as long as the caller's deadline
        and ``admission_max_wait_s`` allow."""

        def candidates() -> list[WorkerState]:
            return self.registry.candidates(
                request.model, request.adapter, request.exclude_worker_ids)

        limit = self._config.max_inflight_per_worker
        if limit <= 0:
            return candidates()
        queue = self._admission.setdefault(request.model, Admission(limit))
        wait_s = self._config.admission_max_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - ADMISSION_DEADLINE_MARGIN_S)
        started = time.monotonic()
        self.metrics.admission_waiting.inc()
        try:
            # This router's own count: exact and immediate (reports lag a finish).
            return await queue.admit(candidates, lambda w: len(w.in_flight), wait_s)
        except AdmissionTimeout as exc:
            raise RateLimitedError(
                f"every worker serving `{request.model}` has {limit} requests in flight "
                f"and none freed a slot in {exc.waited_s:.1f}s",
                retry_after_s=max(1, round(exc.waited_s / 4))) from None
        finally:
            self.metrics.admission_waiting.dec()
            self.metrics.admission_wait_seconds.observe(time.monotonic() - started)

    def _wake_admission(self) -> None:
        for queue in self._admission.values():
            queue.notify()

    async def RequestFinished(
        self, request: router_pb2.RequestFinishedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RequestFinishedResponse:
        self.registry.finished(request.worker_id, request.request_id)
        if isinstance(self.policy, KvAwarePolicy):
            self.policy.finished(request.request_id)
        self._wake_admission()
        return router_pb2.RequestFinishedResponse()

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        now = time.monotonic()
        statuses = [
            router_pb2.WorkerStatus(
                worker=worker_to_proto(w),
                load=common_pb2.WorkerLoad(
                    num_running=w.load.num_running,
                    num_waiting=w.load.num_waiting,
                    kv_usage=w.load.kv_usage,
                    in_flight=len(w.in_flight),
                    age_s=now - w.load.reported_at if w.load.reported_at else -1.0,
                    cache_hit_rate=w.load.cache_hit_rate or 0.0,
                ),
                last_seen_age_s=now - w.last_seen,
                indexed_blocks=self.index.blocks(w.worker_id),
            )
            for w in sorted(self.registry.all(), key=lambda w: w.worker_id)
            if not request.model or w.model == request.model
        ]
        return router_pb2.ListWorkersResponse(workers=statuses, policy=self.policy.name)

    async def WatchWorkers(
        self, request: router_pb2.WatchWorkersRequest, context: grpc.aio.ServicerContext
    ):  # type: ignore[override]
        sent = -1

        def changed() -> bool:
            return self.registry.version != sent

        while True:
            async with self._changed:
                await self._changed.wait_for(changed)
                sent = self.registry.version
                workers = [worker_to_proto(w) for w in self.registry.all()]
            yield router_pb2.WorkerSet(workers=workers, version=sent,
                                       router_metrics_endpoint=self.metrics_endpoint)
