"""Workers' lives as the router sees them: registration, probes, KV-event followers,
lease expiry and index snapshots. This is the part of the router that talks to
workers over gRPC; what it learns goes into the ``RouterCore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from smg_grpc_proto import vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2 as smg_common_pb2

from kvmesh.core.errors import InvalidRequestError, KvmeshError
from kvmesh.core.grpc_util import RECONNECT_BACKOFF_MAX_S, internal_channel
from kvmesh.core.roles import GATEWAY, is_gateway, role_from_proto
from kvmesh.router import snapshot, worker_probe
from kvmesh.router.core import RouterCore
from kvmesh.router.kv_events import KvEventFollower
from kvmesh.router.policy.factory import POLICY_NAMES
from kvmesh.router.prefix_index import pack_views
from kvmesh.router.registry import WorkerState
from kvmesh.router.warmup import Warmup
from kvmesh.v1 import common_pb2

log = logging.getLogger(__name__)


#: A pushed load record this recent keeps a worker from being polled: two of the
#: heartbeats a worker's event stream sends each second when it has nothing else to
#: send (``smg_grpc_servicer.load_record.HEARTBEAT_INTERVAL``).
PUSH_FRESH_S = 2.0


def probe_pauses(interval_s: float, rng: random.Random) -> Iterator[float]:
    """The pauses between one worker's probes: a first one anywhere in the interval
    (its phase), then the interval give or take 10% (phases drift apart rather than
    line up again). Their mean is the interval."""
    yield rng.uniform(0.0, interval_s)
    while True:
        yield interval_s * rng.uniform(0.9, 1.1)


class WorkerLifecycle:
    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self._config = core.config
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._engines: dict[str, vllm_engine_pb2_grpc.VllmEngineStub] = {}
        self._watchers: dict[str, list[asyncio.Task[None]]] = {}
        self.followers: dict[str, KvEventFollower] = {}
        self._incarnations: dict[str, float] = {}
        self._pushed_at: dict[str, float] = {}  # last load record from the event stream
        self._restorable: dict[str, snapshot.WorkerSnapshot] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._probing: set[asyncio.Task[None]] = set()  # probes started by a broken stream
        self._rng = random.Random()  # the probe loops' phases
        # Once its channel is back (within a reconnect backoff, jittered by up to 20%),
        # every worker heartbeats (and so re-registers) within one interval, plus its
        # registration's probes.
        self.warmup = Warmup(2 * self._config.heartbeat_interval_s + 1.0
                             + 1.2 * RECONNECT_BACKOFF_MAX_S)

    # ---- start and stop ----------------------------------------------------------
    async def start(self) -> None:
        path = self._config.snapshot_path
        if path is not None:
            self._restorable = await asyncio.to_thread(
                snapshot.read, path, self._config.snapshot_max_age_s)
            if self._restorable:
                log.info("snapshot %s holds views of %d worker(s); restored as they register",
                         path, len(self._restorable))
                self.warmup.expect(self._restorable)
            self._tasks.append(asyncio.create_task(self._snapshot_loop(path)))
        self._tasks.append(asyncio.create_task(self._expire_loop()))
        for endpoint in self._config.static_workers:
            self._tasks.append(asyncio.create_task(self._register_static(endpoint)))

    async def stop(self) -> None:
        if self._config.snapshot_path is not None:
            with contextlib.suppress(OSError):
                await self.take_snapshot(self._config.snapshot_path)
        tasks = [*self._tasks, *self._probing,
                 *(t for ts in self._watchers.values() for t in ts)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for channel in self._channels.values():
            await channel.close()

    def warming(self) -> str:
        """Why the router cannot route or tell its worker set yet ("" when it can): the
        snapshot's workers not registered again, or, just started, none at all."""
        missing = self.warmup.missing(w.worker_id for w in self.core.registry.all())
        if missing:
            return f"router restarted; waiting for {len(missing)} worker(s) to register again"
        if self.warmup.young() and not self.core.registry.models():
            return "router just started; no worker registered yet"
        return ""

    # ---- snapshots ---------------------------------------------------------------
    async def take_snapshot(self, path: Path) -> None:
        views = self.core.index.export_views()  # copies, taken on the loop; the rest off it
        registered = {w.worker_id for w in self.core.workers()}
        incarnations = {w: i for w, i in self._incarnations.items() if w in registered}

        def work() -> None:
            packed = pack_views(views)
            # Workers with nothing cached are listed too: a restart waits for them.
            for worker_id in incarnations.keys() - packed.keys():
                packed[worker_id] = snapshot.empty_view()
            snapshot.write(path, snapshot.capture(packed, incarnations))

        await asyncio.to_thread(work)

    async def _snapshot_loop(self, path: Path) -> None:
        while True:
            await asyncio.sleep(self._config.snapshot_interval_s)
            try:
                await self.take_snapshot(path)
            except OSError as exc:
                log.warning("index snapshot to %s failed: %s", path, exc)

    # ---- registration --------------------------------------------------------------
    async def register(self, info: common_pb2.WorkerInfo) -> WorkerState:
        """Describe the worker (GetModelInfo & co.), add it to the core, restore its
        cache view from a snapshot of this very incarnation, and follow it."""
        if not info.endpoint:
            raise InvalidRequestError("worker.endpoint is required", param="worker.endpoint")
        if is_gateway(info.role):
            return await self._register_gateway(info)
        if info.routing_policy and info.routing_policy not in POLICY_NAMES:
            raise InvalidRequestError(
                f"unknown routing policy {info.routing_policy!r}; choose one of "
                f"{', '.join(POLICY_NAMES)}", param="worker.routing_policy")
        facts = await worker_probe.describe(self._engine(info.endpoint),
                                            self._config.probe_timeout_s)
        state = WorkerState(
            worker_id=info.worker_id or info.endpoint,
            endpoint=info.endpoint,
            model=info.model or facts.model,
            role=role_from_proto(info.role),
            adapters=tuple(info.adapters),
            servable_adapters=tuple(sorted(info.servable_adapters)),
            lora_slots=info.lora_slots,
            block_size=info.block_size or facts.block_size,
            max_context_length=info.max_context_length or facts.max_context_length,
            kv_capacity_tokens=info.kv_capacity_tokens or facts.kv_capacity_tokens,
            metrics_endpoint=info.metrics_endpoint,
            nixl_side_channel=info.nixl_side_channel,
            kv_connector=info.kv_connector,
            dp_rank=info.dp_rank,
            policy=info.routing_policy,
            dp_group=info.dp_group,
            dp_size=info.dp_size,
            self_registered=info.self_registered,
            draining=info.draining,
        )
        self.core.add_worker(state)
        self._stop_watching(state.worker_id)
        self._incarnations[state.worker_id] = facts.incarnation
        saved = self._restorable.pop(state.worker_id, None)
        if saved is not None and snapshot.same_incarnation(saved.incarnation, facts.incarnation):
            restored = snapshot.restore(self.core.index, state.worker_id, saved)
            log.info("restored %d indexed blocks of %s from the snapshot", restored,
                     state.worker_id)
        self._follow(state)
        log.info(
            "registered worker %s at %s (model=%s role=%s block_size=%d%s)",
            state.worker_id, state.endpoint, state.model, state.role, state.block_size,
            f" {state.kv_connector} side channel {state.nixl_side_channel}"
            if state.kv_connector else "",
        )
        await self.core.notify()
        return state

    async def _register_gateway(self, info: common_pb2.WorkerInfo) -> WorkerState:
        """A gateway replica: kept (lease, heartbeats) for WatchWorkers' ``gateways``
        only; it serves no VllmEngine, so nothing is probed or followed."""
        if not info.http_endpoint:
            raise InvalidRequestError("a gateway registers its http_endpoint",
                                      param="worker.http_endpoint")
        state = WorkerState(worker_id=info.worker_id or info.endpoint, endpoint=info.endpoint,
                            model="", role=GATEWAY, http_endpoint=info.http_endpoint,
                            self_registered=info.self_registered)
        self.core.add_worker(state)
        log.info("registered gateway %s (HTTP %s, gRPC %s)", state.worker_id,
                 state.http_endpoint, state.endpoint)
        await self.core.notify()
        return state

    async def deregister(self, worker_id: str) -> bool:
        removed = self.core.remove_worker(worker_id)
        for wid in {worker_id, *removed}:
            self._stop_watching(wid)
        if removed:
            log.info("worker %s deregistered", worker_id)
            await self.core.notify()
        return bool(removed)

    async def _register_static(self, endpoint: str) -> None:
        """Keep trying to register a by-address worker until it answers."""
        info = common_pb2.WorkerInfo(endpoint=endpoint, self_registered=False)
        while True:
            try:
                await self.register(info)
                return
            except grpc.aio.AioRpcError as exc:
                log.info("static worker %s not reachable yet: %s", endpoint, exc.code().name)
                await asyncio.sleep(self._config.probe_interval_s)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self._config.heartbeat_interval_s, 1.0))
            for worker_id in self.core.expire():
                log.warning("worker %s expired (no heartbeat or probe)", worker_id)
                self._stop_watching(worker_id)
                await self.core.notify()
            if self._config.autoscale.enabled:
                self.core.autoscale(time.monotonic())

    # ---- following a worker ----------------------------------------------------------
    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = internal_channel(endpoint)
        return channel

    def _engine(self, endpoint: str) -> vllm_engine_pb2_grpc.VllmEngineStub:
        stub = self._engines.get(endpoint)
        if stub is None:
            stub = self._engines[endpoint] = vllm_engine_pb2_grpc.VllmEngineStub(
                self._channel(endpoint))
        return stub

    def _stop_watching(self, worker_id: str) -> None:
        for task in self._watchers.pop(worker_id, []):
            task.cancel()
        self.followers.pop(worker_id, None)
        self._pushed_at.pop(worker_id, None)

    def _follow(self, state: WorkerState) -> None:
        """Its KV events (with the load they carry) and a GetLoads probe loop."""
        worker_id = state.worker_id

        channel = self._channel(state.endpoint)
        follower = KvEventFollower(
            worker_id, channel, self.core.index, state.model,
            state.block_size, on_load=lambda load: self.pushed_load(worker_id, load),
            metrics=self.core.metrics,
            incarnation=self._incarnations.get(worker_id, 0.0),
            probe_incarnation=lambda: worker_probe.incarnation(
                self._engine(state.endpoint), self._config.probe_timeout_s),
            idle_timeout_s=self._config.kv_event_idle_timeout_s,
            on_break=lambda: self._probe_now(worker_id),
        )
        self.followers[worker_id] = follower
        self._watchers[worker_id] = [
            asyncio.create_task(self._probe_loop(worker_id, state.endpoint)),
            asyncio.create_task(follower.run()),
        ]

    def pushed_load(self, worker_id: str, load: smg_common_pb2.EngineLoad) -> None:
        """A load record from the worker's event stream (with every batch, and as a
        heartbeat): fresher than polling, and it carries the prefill work in hand (the
        engine's pending prompt tokens, running prefills included), which GetLoads
        does not."""
        pending = load.waiting_uncached_tokens
        if load.HasField("prefill_pending_tokens"):
            pending = max(pending, load.prefill_pending_tokens)
        self._pushed_at[worker_id] = time.monotonic()
        self.core.report_load(
            worker_id, load.running_requests, load.waiting_requests, load.token_usage,
            pending, load.cache_hit_rate if load.HasField("cache_hit_rate") else None,
        )

    async def _probe_loop(self, worker_id: str, endpoint: str) -> None:
        """Poll GetLoads: it is both the load feed and the liveness probe, unless the
        worker's event stream is both (``fed_by_stream``). Each loop runs at its own
        phase (``probe_pauses``): workers that registered together would otherwise be
        polled together, a burst of calls once per interval that stalled routing
        decisions behind it (tens of ms at 256 workers)."""
        for pause in probe_pauses(self._config.probe_interval_s, self._rng):
            if self.fed_by_stream(worker_id):
                self.core.metrics.load_polls.labels("skipped").inc()
            else:
                await self.probe(worker_id, endpoint)
            await asyncio.sleep(pause)

    def fed_by_stream(self, worker_id: str) -> bool:
        """The worker's event stream is open and pushed a load record lately (two probe
        intervals, at least ``PUSH_FRESH_S``): that record proves the worker alive and
        feeds its load instead of the poll (``probe``), so the poll is skipped (a unary
        call costs the router's one event loop ~0.15 ms: 256 workers polled each second
        were ~4% of its core). When the stream breaks on a lost connection the worker
        is probed at once (``_probe_now``); when it falls silent, polls resume."""
        follower = self.followers.get(worker_id)
        fresh_s = max(2 * self._config.probe_interval_s, PUSH_FRESH_S)
        if follower is None or not follower.streaming or self._push_age_s(worker_id) > fresh_s:
            return False
        try:
            return not self.core.registry.get(worker_id).unreachable
        except KvmeshError:
            return False

    def _push_age_s(self, worker_id: str) -> float:
        """Seconds since the worker's event stream pushed a load record (inf: never)."""
        return time.monotonic() - self._pushed_at.get(worker_id, -math.inf)

    def _probe_now(self, worker_id: str) -> None:
        """The worker's event stream broke on a lost connection: probe it now (it is
        out of the routing set at once if it is gone), not at its next interval."""
        task = asyncio.get_running_loop().create_task(self.suspect(worker_id))
        self._probing.add(task)
        task.add_done_callback(self._probing.discard)

    async def probe(self, worker_id: str, endpoint: str) -> bool:
        """One GetLoads: its load into the core, and the worker into the routing set
        if it answered, out of it if it could not be reached (refused or reset: a dead
        process). A slow answer (deadline) says nothing about liveness. True when the
        worker answered."""
        try:
            sample = await worker_probe.sample_load(self._engine(endpoint),
                                                    self._config.probe_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug("probe of %s failed: %s", worker_id, exc.code().name)
            self.core.metrics.load_polls.labels("failed").inc()
            if exc.code() == grpc.StatusCode.UNAVAILABLE and \
                    self.core.set_reachable(worker_id, False):
                await self.core.notify()
            return False
        self.core.metrics.load_polls.labels("answered").inc()
        # The poll feeds the load only while the event stream does not: its sample,
        # answered and read at another moment, would overwrite a fresher pushed record
        # with one that lacks the prefill in hand.
        if self._push_age_s(worker_id) > 2 * self._config.probe_interval_s:
            self.core.report_load(
                worker_id, sample.num_running, sample.num_waiting, sample.kv_usage,
                sample.waiting_uncached_tokens, sample.cache_hit_rate,
            )
        if self.core.set_reachable(worker_id, True):
            await self.core.notify()
        return True

    async def suspect(self, worker_id: str) -> None:
        """A gateway lost its connection to the worker mid-request: probe it now
        rather than at the next interval, so a dead worker leaves the routing set at
        once (a live one stays: one gateway's broken connection is not proof)."""
        try:
            worker = self.core.registry.get(worker_id)
        except KvmeshError:
            return
        if worker.role != GATEWAY and not worker.unreachable:
            await self.probe(worker_id, worker.endpoint)
