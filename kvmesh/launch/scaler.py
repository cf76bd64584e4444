"""Following the router's autoscaler: start and drain workers until every pool has the
number of workers the router asks for (``ListWorkers``' pools; docs/autoscaling.md).

The router decides (it sees the load); a scaler only acts. ``Scaler`` polls the router
and asks each pool it runs to grow or shrink by one worker at a time, in the
background, counting workers still starting or draining so it never asks twice for the
same change. A ``WorkerPool`` is how workers come and go: ``ProcessPool`` runs them as
processes on this host (``python -m kvmesh.worker``); ``kvmesh up`` uses Ray actors.
Shrinking drains: the worker leaves the router first (no new work), finishes what it
serves within its drain deadline, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import grpc

from kvmesh.core.config import WorkerConfig
from kvmesh.core.grpc_util import internal_channel
from kvmesh.core.processes import terminate
from kvmesh.core.settings import dump_settings
from kvmesh.launch.pool_runner import RunningPool
from kvmesh.launch.procs import spawn_module, wait_ready_file
from kvmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class WorkerPool(Protocol):
    """The workers of one pool (model, role) that a scaler may add and remove."""

    model: str
    role: str

    def size(self) -> int:
        """Workers running or starting (not those draining)."""
        ...

    async def grow(self) -> None:
        """Start one worker; return once it serves."""
        ...

    async def shrink(self) -> None:
        """Drain one worker and stop it."""
        ...


class Scaler:
    """Keeps each pool at the router's desired size."""

    def __init__(self, router: str, pools: list[WorkerPool], interval_s: float = 1.0) -> None:
        self._channel = internal_channel(router)
        self._router = router_pb2_grpc.RouterStub(self._channel)
        self.pools = {(p.model, p.role): p for p in pools}
        self.interval_s = interval_s
        self.busy: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: (model, role, "grow" | "shrink") of every change made, in order (tests, logs).
        self.changes: list[tuple[str, str, str]] = []

    async def status(self) -> router_pb2.ListWorkersResponse:
        """The router's workers and pools (their desired sizes)."""
        return await self._router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)

    async def step(self) -> None:
        """One look at the router: start at most one change per idle pool."""
        reply = await self.status()
        for status in reply.pools:
            key = (status.model, status.role)
            pool = self.pools.get(key)
            busy = self.busy.get(key)
            if pool is None or (busy is not None and not busy.done()):
                continue
            if status.desired > pool.size():
                self._start(key, "grow", pool.grow)
            elif status.desired < pool.size():
                self._start(key, "shrink", pool.shrink)

    def _start(self, key: tuple[str, str], change: str,
               act: Callable[[], Awaitable[None]]) -> None:
        log.info("autoscale %s/%s: %s", key[0], key[1], change)
        self.changes.append((*key, change))

        async def run() -> None:
            try:
                await act()
            except Exception:
                log.exception("autoscale %s/%s: %s failed", key[0], key[1], change)

        self.busy[key] = asyncio.create_task(run())

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except grpc.aio.AioRpcError as exc:
                log.warning("autoscale: router unreachable (%s)", exc.code().name)
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        """Stop: changes under way are cancelled (a worker half started is removed)."""
        for task in self.busy.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._channel.close()


class ProcessPool:
    """A pool of worker processes on this host, each from one config template (its
    own id and free port per worker)."""

    def __init__(self, template: WorkerConfig, model: str, run_dir: Path,
                 drain_timeout_s: float = 60.0, startup_timeout_s: float = 600.0) -> None:
        self.template, self.model = template, model
        self.startup_timeout_s = startup_timeout_s
        self.role = template.role.value
        self.run_dir = run_dir
        self.drain_timeout_s = drain_timeout_s
        self._names = (f"{model}-{self.role}-{i}" for i in itertools.count())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._starting = 0

    def size(self) -> int:
        return len(self.procs) + self._starting

    async def grow(self) -> None:
        name = next(self._names)
        ready = self.run_dir / f"{name}.ready"
        config = self.template.model_copy(update={"worker_id": name, "port": 0})
        self._starting += 1
        try:
            proc = spawn_module(
                "kvmesh.worker",
                ["--no-ray", "--config", str(dump_settings(config, self.run_dir / f"{name}.json")),
                 "--ready-file", str(ready)], self.run_dir / f"{name}.log")
            try:
                await asyncio.to_thread(wait_ready_file, ready, self.startup_timeout_s, proc,
                                        name)
            except BaseException:  # too slow (or cancelled): not left running half started
                await asyncio.to_thread(terminate, proc, 5.0)
                raise
            self.procs[name] = proc
        finally:
            self._starting -= 1

    async def shrink(self) -> None:
        """The newest worker: SIGTERM makes it leave the router, finish its streams
        (its drain deadline) and exit."""
        if not self.procs:
            return
        name = next(reversed(self.procs))
        proc = self.procs.pop(name)
        await asyncio.to_thread(terminate, proc, self.drain_timeout_s)

    async def close(self) -> None:
        for proc in self.procs.values():
            await asyncio.to_thread(terminate, proc, self.drain_timeout_s)
        self.procs.clear()


class RayPool:
    """One role of a running model's pool of Ray actors (``kvmesh up``, ``build_app``):
    it grows and shrinks the ``RunningPool``'s actors of that role in place, so the
    mesh's state and its stop see every worker. ``make_config(i)`` is the i-th added
    worker's settings; ``on_change`` runs after each change (the state file)."""

    def __init__(self, running: RunningPool, role: str,
                 make_config: Callable[[int], WorkerConfig],
                 on_change: Callable[[], None] = lambda: None,
                 startup_timeout_s: float = 600.0) -> None:
        self.running, self.role = running, role
        self.startup_timeout_s = startup_timeout_s
        self.model = running.model_id
        self.make_config, self.on_change = make_config, on_change
        self._next = itertools.count()
        self._starting = 0

    def _mine(self) -> list[int]:
        return [i for i, w in enumerate(self.running.workers) if w.get("role") == self.role]

    def size(self) -> int:
        return len(self._mine()) + self._starting

    async def grow(self) -> None:
        from kvmesh.launch.pool_runner import start_actors

        self._starting += 1
        try:
            actors, infos = await start_actors([self.make_config(next(self._next))], None, 0,
                                               self.startup_timeout_s)
        finally:
            self._starting -= 1
        self.running.actors.extend(actors)
        self.running.workers.extend(infos)
        self.on_change()

    async def shrink(self) -> None:
        """The newest worker of the role: it leaves the router, finishes its streams,
        stops (``stop_actors``)."""
        from kvmesh.launch.pool_runner import stop_actors

        mine = self._mine()
        if not mine:
            return
        actor = self.running.actors.pop(mine[-1])
        self.running.workers.pop(mine[-1])
        self.on_change()
        await stop_actors([actor])


class Scaling:
    """A Scaler running in the background (``kvmesh up``, ``build_app``); the mesh
    tracks each model's pools as they come and go."""

    def __init__(self, router: str, interval_s: float = 1.0) -> None:
        self.scaler = Scaler(router, [], interval_s)
        self._task = asyncio.create_task(self.scaler.run())

    def track(self, pool: WorkerPool) -> None:
        self.scaler.pools[pool.model, pool.role] = pool

    async def untrack(self, model: str) -> None:
        """Forget ``model``'s pools, a change under way cancelled (it is being removed)."""
        for key in [k for k in self.scaler.pools if k[0] == model]:
            del self.scaler.pools[key]
            busy = self.scaler.busy.pop(key, None)
            if busy is not None:
                busy.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await busy

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.scaler.close()
