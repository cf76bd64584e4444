"""The router's core: who serves what, and where each request goes (no grpc here).

``RouterCore`` owns the worker registry, the prefix index, the policy and the cost
model's parameters. The gRPC servicer maps protobufs onto it; the worker lifecycle
(probes, KV-event followers, snapshots) feeds it. ``route`` is admit → decide → book:

- admit: the candidates with a free slot (``max_inflight_per_worker``), waiting here
  while all are full, as long as the caller's deadline allows;
- decide: the policy, or the P/D decision over it, in one traced span;
- book: the chosen workers' in-flight requests and routed-but-unreported prefill, so
  the next decision sees this one before any worker reports it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

import kvmesh.core.tracing as tracing
from kvmesh.core.config import RouterConfig
from kvmesh.core.errors import ModelNotFoundError, RateLimitedError
from kvmesh.core.roles import GATEWAY
from kvmesh.router.admission import Admission, AdmissionTimeout
from kvmesh.router.autoscale import PoolLoad, PoolScaler
from kvmesh.router.decision_log import DecisionLog
from kvmesh.router.metrics import RouterMetrics, WorkerSample
from kvmesh.router.pd import PdDecision, decide
from kvmesh.router.policy.base import Policy, RouteContext
from kvmesh.router.policy.factory import make_policy
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.registry import Candidates, WorkerRegistry, WorkerState

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

#: Seconds of the Route caller's deadline kept for answering "busy" before it expires.
ADMISSION_DEADLINE_MARGIN_S = 0.5


@dataclass(frozen=True)
class RouteQuery:
    """One Route call: the policy's context plus the workers the caller excludes."""

    ctx: RouteContext
    exclude: Sequence[str] = ()
    #: Seconds left of the caller's deadline (None: no deadline).
    time_remaining_s: float | None = None
    #: Decide only: no admission wait, nothing booked (the endpoint picker's question).
    preview: bool = False
    #: A worker chosen by an earlier preview: kept when it is still a candidate.
    prefer: str = ""
    #: Raise ``AdmissionDeferred`` rather than wait for a worker slot (a RouteBatch
    #: request: its caller asks again on a Route call of its own).
    defer_wait: bool = False


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as ListWorkers shows it: its state, how fresh that is, and how much
    of its cache the index knows."""

    worker: WorkerState
    #: Seconds since the worker's last load report (-1: it has not reported yet).
    load_age_s: float
    last_seen_age_s: float
    indexed_blocks: int


class RouterCore:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or RouterMetrics()
        self.registry = WorkerRegistry(config.lease_ttl_s)
        self.index = PrefixIndex()
        self.cost_params = config.cost
        #: The router's own policy; a model whose workers registered with another one
        #: gets an instance of that (``policy_for``).
        self.policy = make_policy(config.policy, config.seed, self.index, self.cost_params)
        self._model_policies: dict[str, Policy] = {}
        self._policy_names: dict[str, str] = {}
        self._policy_names_version = -1
        self._rng = random.Random(config.seed)
        self.decision_log = (DecisionLog(config.decision_log, self.index, self.cost_params)
                             if config.decision_log else None)
        self._changed = asyncio.Condition()
        self._admission: dict[str, Admission] = {}
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        #: Per pool (model, role): its autoscaler (RouterConfig.autoscale).
        self.scalers: dict[tuple[str, str], PoolScaler] = {}
        fresh_s = 2 * max(config.heartbeat_interval_s, config.probe_interval_s)
        self.metrics.track(
            lambda: len(self.index),
            lambda: [
                WorkerSample(w.worker_id, w.role, self.registry.state_of(w, fresh_s),
                             w.load.num_running, w.load.num_waiting, len(w.in_flight),
                             w.load.kv_usage, w.load.cache_hit_rate,
                             self.index.blocks(w.worker_id))
                for w in self.workers()
            ],
        )

    # ---- the worker set ----------------------------------------------------------
    def add_worker(self, state: WorkerState) -> None:
        """A worker (re-)registered: a restarted worker's old cache view is void."""
        self.registry.upsert(state)
        self.index.clear_worker(state.worker_id)

    def remove_worker(self, worker_id: str) -> list[str]:
        """A worker deregistered or expired: purge what it held from the index. A
        data-parallel rank takes its whole gang with it (a gang does not run short).
        Returns the ids removed."""
        ids = [worker_id, *self.registry.gang_mates(worker_id)]
        removed = [wid for wid in ids if self.registry.remove(wid)]
        for wid in ids:
            self.index.remove_worker(wid)
        if len(removed) > 1:
            log.warning("removed data-parallel gang of %s: %s", worker_id, ", ".join(removed))
        return removed

    async def drain_worker(self, worker_id: str) -> tuple[bool, int]:
        """Route nothing new to the worker (it finishes what it has); whether the
        worker is known and how many routed requests it still has."""
        worker = self.registry.drain(worker_id)
        if worker is None:
            return False, 0
        await self.notify()
        return True, len(worker.in_flight)

    def expire(self) -> list[str]:
        """Workers whose lease ran out (and their gangs), removed from the registry and
        the index."""
        gone: list[str] = []
        for worker_id in self.registry.lapsed():
            if worker_id not in gone:
                gone.extend(self.remove_worker(worker_id))
        return gone

    def heartbeat(self, worker_id: str, adapters: Sequence[str] = (),
                  servable_adapters: Sequence[str] = ()) -> tuple[bool, bool]:
        """A self-registered worker is alive, with these LoRA adapters. Returns whether
        it is known here (False: expired or never registered, it must register again)
        and whether the adapters it can serve changed (``notify`` the watchers)."""
        if not self.registry.touch(worker_id):
            return False, False
        if self.registry.get(worker_id).role == GATEWAY:
            return True, False
        return True, self.registry.report_adapters(worker_id, adapters, servable_adapters)

    def set_reachable(self, worker_id: str, reachable: bool) -> bool:
        """A probe failed to connect (out of the routing set) or answered again (back
        in); True when the set changed. The worker keeps its index view and its lease:
        a blip costs one probe interval, not its cache."""
        changed = self.registry.set_reachable(worker_id, reachable)
        if changed:
            log.warning("worker %s is %s", worker_id,
                        "reachable again" if reachable else "unreachable: not routed to")
        return changed

    def report_load(self, worker_id: str, running: int, waiting: int, kv_usage: float,
                    waiting_uncached_tokens: int, cache_hit_rate: float | None) -> None:
        self.registry.report_load(worker_id, running, waiting, kv_usage,
                                  waiting_uncached_tokens, cache_hit_rate)
        self.wake_admission()

    async def notify(self) -> None:
        """The worker set changed: admission waiters look again, watchers are told."""
        self.wake_admission()
        async with self._changed:
            self._changed.notify_all()

    async def next_worker_set(self, seen_version: int) -> tuple[int, list[WorkerState]]:
        """Wait until the worker set is newer than ``seen_version``; return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.registry.version != seen_version)
            return self.registry.version, list(self.registry.all())

    def workers(self, model: str = "") -> list[WorkerState]:
        """The workers (not the gateway replicas) serving ``model`` (all when empty)."""
        return [w for w in sorted(self.registry.all(), key=lambda w: w.worker_id)
                if w.role != GATEWAY and (not model or w.model == model)]

    def workers_in(self, model: str, role: str) -> list[WorkerState]:
        """One pool's workers."""
        return [w for w in self.workers(model) if w.role == role]

    def statuses(self, model: str = "") -> list[WorkerStatus]:
        """The workers serving ``model`` (all when empty), by id, as ListWorkers
        reports them."""
        now = time.monotonic()
        return [
            WorkerStatus(w, now - w.load.reported_at if w.load.reported_at else -1.0,
                         now - w.last_seen, self.index.blocks(w.worker_id))
            for w in self.workers(model)
        ]

    def autoscale(self, now: float) -> list[PoolScaler]:
        """Show every pool's load to its autoscaler (a pool stays known after its last
        worker left, so the scaler brings it back to its minimum); the scalers."""
        pools: dict[tuple[str, str], list[WorkerState]] = {key: [] for key in self.scalers}
        for w in self.workers():
            pools.setdefault((w.model, w.role), []).append(w)
        for (model, role), members in pools.items():
            scaler = self.scalers.get((model, role))
            if scaler is None:
                scaler = self.scalers[model, role] = PoolScaler(self.config.autoscale,
                                                                model, role)
            desired = scaler.observe(PoolLoad(
                workers=len(members),
                requests=sum(w.active for w in members),
                queued_prefill_tokens=sum(w.load.waiting_uncached_tokens
                                          + w.unreported_prefill_tokens for w in members),
                kv_usage=sum(w.load.kv_usage for w in members)), now)
            self.metrics.desired_workers.labels(model, role).set(desired)
            self.metrics.pool_need.labels(model, role).set(scaler.need)
        return list(self.scalers.values())

    def policy_for(self, model: str) -> Policy:
        """The policy routing ``model``: the one its workers registered with (a model's
        ``policy`` in kvmesh's ModelConfig; the lowest worker id naming one wins), else
        the router's own. Each model with a policy of its own gets its instance (a
        round-robin turn, a random stream per model); all share the prefix index."""
        if self._policy_names_version != self.registry.version:
            names: dict[str, str] = {}
            for w in sorted(self.registry.all(), key=lambda w: w.worker_id):
                if w.policy and w.role != GATEWAY:
                    names.setdefault(w.model, w.policy)
            self._policy_names, self._policy_names_version = names, self.registry.version
        wanted = self._policy_names.get(model, "")
        if not wanted or wanted == self.policy.name:
            return self.policy
        policy = self._model_policies.get(model)
        if policy is None or policy.name != wanted:
            policy = self._model_policies[model] = make_policy(
                wanted, self.config.seed, self.index, self.cost_params)
        return policy

    # ---- requests ----------------------------------------------------------------
    async def route(self, query: RouteQuery) -> PdDecision:
        ctx = query.ctx
        if ctx.model not in self.registry.models():
            raise ModelNotFoundError(f"the model `{ctx.model}` does not exist", param="model")
        workers: Sequence[WorkerState]
        if query.preview or self.config.max_inflight_per_worker <= 0:  # no slot to wait for
            workers = self.registry.candidates(ctx.model, ctx.adapter, query.exclude)
        else:
            workers = await self._admit(query)
        pinned = [w for w in workers if w.worker_id == query.prefer] if query.prefer else []
        if pinned and pinned[0].role != "decode":
            workers = pinned
        prefill: Sequence[WorkerState] = ()
        decode: Sequence[WorkerState] = ()
        if "prefill" in self.registry.roles():  # no P/D pools: no P/D decision to make
            prefill = self.registry.candidates(ctx.model, ctx.adapter, query.exclude,
                                               roles=("prefill",))
            if isinstance(workers, Candidates):  # the whole selection: its decode part
                decode = self.registry.candidates(
                    ctx.model, ctx.adapter, query.exclude, roles=("decode",))
            else:
                decode = [w for w in workers if w.role == "decode"]
        choice = self._decide(ctx, workers, prefill, decode)
        if not query.preview:
            self._book(ctx, choice)
        return choice

    def finish(self, worker_id: str, request_id: str) -> None:
        self.registry.finished(worker_id, request_id)
        for policy in (self.policy, *self._model_policies.values()):
            policy.finished(request_id)
        self.wake_admission()

    def _decide(self, ctx: RouteContext, workers: Sequence[WorkerState],
                prefill: Sequence[WorkerState], decode: Sequence[WorkerState]) -> PdDecision:
        started = time.perf_counter()
        policy = self.policy_for(ctx.model)
        if not tracing.enabled():  # no span to make (a no-op one still costs ~10 µs)
            choice = decide(policy, ctx, workers, prefill, decode,
                            self.config.disaggregation, self.cost_params, self._rng)
        else:
            with tracer.start_as_current_span("decide") as span:
                choice = decide(policy, ctx, workers, prefill, decode,
                                self.config.disaggregation, self.cost_params, self._rng)
                span.set_attributes({
                    "kvmesh.route.policy": policy.name,
                    "kvmesh.route.reason": choice.reason,
                    "kvmesh.worker": choice.worker.worker_id,
                    "kvmesh.route.expected_cached_tokens": choice.expected_cached_tokens,
                    "kvmesh.route.candidates": len(workers),
                    "kvmesh.route.disaggregated": choice.prefill_worker is not None,
                })
        seconds, count = self._decision_metrics(policy.name, choice.reason)
        seconds.observe(time.perf_counter() - started)
        count.inc()
        self.metrics.matched_prefix_tokens.observe(choice.expected_cached_tokens)
        if self.decision_log is not None and choice.prefill_worker is None:
            explained = getattr(policy, "last", None)  # kv_aware's workings
            if explained is not None and len(explained.cached) == len(workers):
                self.decision_log.write(ctx, explained, workers)
        return choice

    def _decision_metrics(self, policy: str, reason: str) -> tuple[Any, Any]:
        """The decision histogram and counter children for (policy, reason), looked up
        once (``labels`` takes a lock and builds a key on every call)."""
        children = self._metric_children.get((policy, reason))
        if children is None:
            children = self._metric_children[policy, reason] = (
                self.metrics.decision_seconds.labels(policy),
                self.metrics.decisions.labels(policy, reason))
        return children

    def _book(self, ctx: RouteContext, choice: PdDecision) -> None:
        uncached = max(len(ctx.token_ids) - choice.expected_cached_tokens, 0)
        if choice.prefill_worker is not None:
            self.registry.routed(choice.prefill_worker.worker_id, ctx.request_id, uncached)
            self.registry.routed(choice.worker.worker_id, ctx.request_id, 0)
        else:
            self.registry.routed(choice.worker.worker_id, ctx.request_id, uncached)
        if ctx.adapter:
            adapter_worker = choice.prefill_worker or choice.worker
            self.metrics.adapter_routes.labels(
                "loaded" if ctx.adapter in adapter_worker.adapters else "load").inc()
            self.registry.adapter_routed(choice.worker.worker_id, ctx.adapter)
            if choice.prefill_worker is not None:
                self.registry.adapter_routed(choice.prefill_worker.worker_id, ctx.adapter)
        log.debug("route %s -> %s%s (%s)", ctx.request_id, choice.worker.worker_id,
                  f" after prefill on {choice.prefill_worker.worker_id}"
                  if choice.prefill_worker else "", choice.reason)

    async def _admit(self, query: RouteQuery) -> list[WorkerState]:
        """The candidate workers with a free slot; waits at the router while every
        one is full (``max_inflight_per_worker``), as long as the caller's deadline
        and ``admission_max_wait_s`` allow. Only with a limit set: ``route`` takes the
        candidates directly otherwise."""
        ctx = query.ctx

        def candidates() -> list[WorkerState]:
            return self.registry.candidates(ctx.model, ctx.adapter, query.exclude)

        limit = self.config.max_inflight_per_worker
        queue = self._admission.setdefault(ctx.model, Admission(limit))
        wait_s = self.config.admission_max_wait_s
        if query.time_remaining_s is not None:
            wait_s = min(wait_s, query.time_remaining_s - ADMISSION_DEADLINE_MARGIN_S)
        started = time.monotonic()
        self.metrics.admission_waiting.inc()
        try:
            # This router's own count: exact and immediate (reports lag a finish).
            return await queue.admit(candidates, lambda w: len(w.in_flight), wait_s,
                                     defer=query.defer_wait)
        except AdmissionTimeout as exc:
            raise RateLimitedError(
                f"every worker serving `{ctx.model}` has {limit} requests in flight "
                f"and none freed a slot in {exc.waited_s:.1f}s",
                retry_after_s=max(1, round(exc.waited_s / 4))) from None
        finally:
            self.metrics.admission_waiting.dec()
            self.metrics.admission_wait_seconds.observe(time.monotonic() - started)

    def wake_admission(self) -> None:
        for queue in self._admission.values():
            queue.notify()
