"""``kvmesh.build_app``: a whole mesh as one application object.

Like Ray Serve LLM's ``build_openai_app(llm_configs)``, ``build_app(config)`` turns a
``MeshConfig`` (its ``models`` list, or the single-model shorthand) into an
application: ``start()`` brings up the router, each model's worker pool as Ray actors,
the gateways (and Envoy with ``edge``) and the admin service; ``stop()`` takes it all
down in order; ``addresses`` says where to send requests. `kvmesh up`, `kvmesh deploy
ray`, the benchmarks and the tests all start a mesh this way. While it runs,
``add_model``/``remove_model`` (or `kvmesh models add/remove` through the admin
service) change the pools; gateways follow through the router's WatchWorkers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kvmesh.core.config import WorkerConfig
from kvmesh.core.errors import ModelExistsError, ModelNotFoundError
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.model_config import ModelConfig
from kvmesh.core.net import free_port
from kvmesh.core.roles import WorkerRole
from kvmesh.launch import placement
from kvmesh.launch.loop_thread import LoopThread
from kvmesh.launch.pool_runner import RunningPool, start_actors, stop_pool
from kvmesh.launch.pools import check_cpus, plan_added_pool, plan_pools, with_ranks
from kvmesh.launch.services import MeshServices, wait_registered
from kvmesh.models.source import resolve_model, served_name

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class MeshAddresses:
    """Where a running mesh answers."""

    http: str  # OpenAI API base URL (…/v1); Envoy's with the edge on
    grpc: str  # kvmesh.v1.Inference host:port
    router: str  # kvmesh.v1.Router host:port
    admin: str | None  # kvmesh.v1.MeshAdmin host:port (None: turned off)


def build_app(config: MeshConfig | dict[str, Any], run_dir: Path | None = None,
              verbose: bool = False) -> MeshApp:
    """The application for ``config`` (a MeshConfig, or its mapping: validated here, so
    a bad key fails now, before anything starts; ``KVMESH_*`` environment variables fill
    what the mapping leaves out, as for `kvmesh up`). Start it with ``await
    app.start()``, ``async with app``, or ``with app`` from synchronous code."""
    if not isinstance(config, MeshConfig):
        config = MeshConfig(**config)
    return MeshApp(config, run_dir, verbose)


def model_id_of(model: ModelConfig) -> str:
    """The id a model is served under: its ``model_id``, else the name its source gives
    (resolving, so fetching, the source first)."""
    if model.model_id:
        resolve_model(model.source)
        return model.model_id
    return served_name(model.source, resolve_model(model.source))


class MeshApp:
    def __init__(self, config: MeshConfig, run_dir: Path | None = None,
                 verbose: bool = False) -> None:
        self.config = config
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="kvmesh-up-"))
        self.verbose = verbose
        self.services = MeshServices(config, self.run_dir)
        self._pools: dict[str, RunningPool] = {}
        self._group: Any = None  # the starting pools' placement group (placement)
        self._lock: asyncio.Lock | None = None
        self._thread: LoopThread | None = None
        self._started_at = 0.0
        self.startup_s = 0.0
        self._router = ""
        #: The router's autoscale followed (RouterConfig.autoscale), or None.
        self._scaling: Any = None
        #: Called with the new state after every change (`kvmesh up` rewrites its file).
        self.on_change: Callable[[dict[str, Any]], None] | None = None

    # ---- the whole mesh ------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Bring everything up; returns :attr:`state`."""
        self._started_at = time.monotonic()
        cfg = self.services.config  # with the mesh-wide tracing/logging copied in
        models = cfg.model_configs()
        # Fetched here, with the progress bar on the user's terminal; the workers then
        # find each model in this node's cache.
        ids = [await asyncio.to_thread(model_id_of, m) for m in models]
        for m in models:  # each model's LoRA adapters too, before its workers ask
            engines = m.role_engines(cfg.worker.engine)
            lora = engines[0][1].lora if engines else None
            for name, source in (lora.adapters if lora and lora.enable_lora else {}).items():
                log.info("LoRA adapter %s ready at %s", name,
                         await asyncio.to_thread(resolve_model, source))
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ModelExistsError(f"two models would be served as {', '.join(duplicates)}; "
                                   "give them distinct model_id", param="model_id")
        if cfg.ray_address is None:  # a Ray of our own: its CPUs are this machine's
            check_cpus([w for p in plan_pools(cfg, "", self.run_dir) for w in p.workers],
                       os.cpu_count() or 1, "this machine")
        try:
            router = await self.services.start_router()
            await asyncio.to_thread(self.services.init_ray, self.verbose)
            planned = plan_pools(cfg, router, self.run_dir)
            # A data-parallel worker is one actor per rank, its gang in a group of its own.
            ranks = with_ranks(cfg, planned, free_port)
            everyone = [w for pool in ranks for w in pool]
            self._group = await asyncio.to_thread(
                placement.Placement, everyone, cfg.placement, cfg.startup_timeout_s)
            log.info("starting %d worker(s) for %d model(s) (first start compiles; see %s)",
                     len(everyone), len(planned), self.run_dir)
            actors, infos = await start_actors(everyone, self._group, 0, cfg.startup_timeout_s)
            first = 0
            for plan, pool_ranks, model_id in zip(planned, ranks, ids, strict=True):
                n = len(pool_ranks)
                self._pools[model_id] = RunningPool(
                    plan.model, model_id, actors[first:first + n], infos[first:first + n])
                first += n
            await self.services.start_gateways(set(self._pools))
            await self.services.start_admin(self)
            self._router = router
            if cfg.router.autoscale.enabled:  # every replica decides alike; ask the first
                from kvmesh.launch.scaler import Scaling

                self._scaling = Scaling(self.services.router)
                for pool in self._pools.values():
                    self._autoscale(pool)
        except BaseException:
            await self.stop()
            raise
        self.startup_s = round(time.monotonic() - self._started_at, 1)
        return self.state

    async def stop(self) -> None:
        """Stop everything this application started (safe to call twice)."""
        if self._scaling is not None:
            await self._scaling.stop()
            self._scaling = None
        await self.services.stop_front()
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(stop_pool(p) for p in pools))
        placement.release(self._group)
        self._group = None
        await self.services.stop_back()

    @property
    def addresses(self) -> MeshAddresses:
        s = self.services
        return MeshAddresses(http=s.http, grpc=s.grpc, router=s.router, admin=s.admin)

    @property
    def state(self) -> dict[str, Any]:
        """Addresses, models, workers and PIDs (what `kvmesh up` writes to its state
        file for `kvmesh status`/`down`/`models`)."""
        pools = list(self._pools.values())
        workers = [w for p in pools if not p.pooling for w in p.workers]
        embedding_workers = [w for p in pools if p.pooling for w in p.workers]
        return {
            **self.services.state(),
            "models": [{"model_id": p.model_id, "embedding": p.pooling,
                        "workers": [w["worker_id"] for w in p.workers]} for p in pools],
            "workers": workers,
            "embedding_workers": embedding_workers,
            "pids": {**self.services.pids(),
                     "workers": [w["pid"] for w in workers + embedding_workers]},
            "run_dir": str(self.run_dir),
            "startup_s": self.startup_s,
        }

    # ---- pools while running -------------------------------------------------------
    def models(self) -> list[RunningPool]:
        return list(self._pools.values())

    async def add_model(self, model: ModelConfig) -> RunningPool:
        """Start ``model``'s pool; returns once its workers serve and the router lists
        them (gateways then learn it from WatchWorkers)."""
        if not self.services.router:
            raise RuntimeError("the app is not running: start it before adding models")
        async with self._one_change():
            model_id = await asyncio.to_thread(model_id_of, model)
            if model_id in self._pools:
                raise ModelExistsError(f"the mesh already serves `{model_id}`",
                                       param="model_id")
            cfg = self.services.config
            free = await asyncio.to_thread(self.services.free_cpus)
            bound = sum(len(p.workers) for p in self._pools.values() if not p.pooling)
            plan = plan_added_pool(cfg, model, self.services.router, self.run_dir, free, bound)
            if cfg.ray_address is None:
                check_cpus(plan.workers, free, "the mesh's Ray (free now)")
            group = await asyncio.to_thread(placement.reserve, plan.workers, cfg.placement,
                                            cfg.startup_timeout_s, f"kvmesh-model-{model_id}")
            try:
                actors, infos = await start_actors(plan.workers, group, 0,
                                                   cfg.startup_timeout_s)
            except BaseException:
                placement.release(group)
                raise
            pool = RunningPool(model, model_id, actors, infos, group)
            self._pools[model_id] = pool
            await wait_registered(self.services.router, model_id,
                                  {w["worker_id"] for w in infos})
            self._autoscale(pool)
            log.info("model %s added: %d worker(s)", model_id, len(infos))
        self._changed()
        return pool

    async def remove_model(self, model_id: str) -> RunningPool:
        """Stop ``model_id``'s pool: its workers deregister, so gateways drop it."""
        async with self._one_change():
            pool = self._pools.get(model_id)
            if pool is None:
                raise ModelNotFoundError(
                    f"the mesh serves no model `{model_id}` (it serves "
                    f"{', '.join(self._pools) or 'none'})", param="model_id")
            if self._scaling is not None:
                await self._scaling.untrack(model_id)
            await stop_pool(pool)
            del self._pools[model_id]
            log.info("model %s removed", model_id)
        self._changed()
        return pool

    def _autoscale(self, pool: RunningPool) -> None:
        """Let the router's autoscaler size each role of a generative pool."""
        if self._scaling is None or pool.pooling:
            return
        from kvmesh.launch.pools import scaled_worker
        from kvmesh.launch.scaler import RayPool

        cfg = self.services.config
        for role in dict.fromkeys(r for r, _ in pool.model.role_engines(cfg.worker.engine)):
            def make(i: int, role: WorkerRole = role) -> WorkerConfig:
                return scaled_worker(cfg, pool.model, self._router, self.run_dir, role, i)

            self._scaling.track(RayPool(pool, role.value, make, self._changed,
                                        startup_timeout_s=cfg.startup_timeout_s))

    def _one_change(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.state)

    # ---- context managers ------------------------------------------------------------
    async def __aenter__(self) -> MeshApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> MeshApp:
        """Run the mesh from synchronous code: its event loop (admin service, pool
        changes) lives on a thread of its own until ``__exit__``."""
        self._thread = LoopThread()
        try:
            self._thread.run(self.start())
        except BaseException:
            self._thread.close()
            self._thread = None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            try:
                self._thread.run(self.stop())
            finally:
                self._thread.close()
                self._thread = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one of this app's coroutines (``add_model``, ``remove_model``) from
        synchronous code, on the app's loop (inside ``with app``)."""
        if self._thread is None:
            coro.close()
            raise RuntimeError("call() runs on the loop of `with app:`; use await otherwise")
        return self._thread.run(coro)
