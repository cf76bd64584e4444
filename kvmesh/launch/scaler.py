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
from typing import Any, Protocol

import grpc

from kvmesh.core.config import WorkerConfig
from kvmesh.core.processes import terminate
from kvmesh.core.settings import dump_settings
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
        self._channel = grpc.aio.insecure_channel(router)
        self._router = router_pb2_grpc.RouterStub(self._channel)
        self.pools = {(p.model, p.role): p for p in pools}
        self.interval_s = interval_s
        self._busy: dict[tuple[str, str], asyncio.Task[None]] = {}
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
            busy = self._busy.get(key)
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

        self._busy[key] = asyncio.create_task(run())

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except grpc.aio.AioRpcError as exc:
                log.warning("autoscale: router unreachable (%s)", exc.code().name)
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        """Stop: changes under way are cancelled (a worker half started is removed)."""
        for task in self._busy.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._channel.close()


class ProcessPool:
    """A pool of worker processes on this host, each from one config template (its
    own id and free port per worker)."""

    def __init__(self, template: WorkerConfig, model: str, run_dir: Path,
                 drain_timeout_s: float = 60.0) -> None:
        self.template, self.model = template, model
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
            await asyncio.to_thread(wait_ready_file, ready, 600, proc, name)
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
    """A pool of worker actors on the Ray cluster (``kvmesh up``): ``make_config(i)``
    gives the i-th worker's settings; ``adopt`` takes the actors already started."""

    def __init__(self, make_config: Callable[[int], WorkerConfig], model: str, role: str,
                 drain_timeout_s: float = 60.0) -> None:
        self.make_config, self.model, self.role = make_config, model, role
        self.drain_timeout_s = drain_timeout_s
        self.actors: list[Any] = []
        self._next = itertools.count()
        self._starting = 0

    def adopt(self, actors: list[Any]) -> None:
        self.actors.extend(actors)
        self._next = itertools.count(len(self.actors))

    def size(self) -> int:
        return len(self.actors) + self._starting

    async def grow(self) -> None:
        from kvmesh.worker.actor import spawn_worker_actor

        actor = spawn_worker_actor(self.make_config(next(self._next)))
        self._starting += 1
        try:
            await actor.start.remote()
            self.actors.append(actor)
        except BaseException:
            _kill(actor)
            raise
        finally:
            self._starting -= 1

    async def shrink(self) -> None:
        """The newest worker: it leaves the router, finishes its streams, stops."""
        if self.actors:
            await self._stop(self.actors.pop())

    async def _stop(self, actor: Any) -> None:
        try:
            await asyncio.wait_for(actor.stop.remote(), self.drain_timeout_s)
        except Exception as exc:  # a dead actor must not block the others
            log.warning("worker stop failed: %s", exc)
        _kill(actor)

    async def close(self) -> None:
        actors, self.actors = self.actors, []
        await asyncio.gather(*[self._stop(a) for a in actors])


def _kill(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor)


class Scaling:
    """A Scaler running in the background with the pools it drives (``kvmesh up``)."""

    def __init__(self, scaler: Scaler, pools: list[RayPool]) -> None:
        self.scaler, self.pools = scaler, pools
        self._task = asyncio.create_task(scaler.run())

    @classmethod
    def start(cls, router: str, pools: list[RayPool]) -> Scaling:
        return cls(Scaler(router, list(pools)), pools)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.scaler.close()
        await asyncio.gather(*[p.close() for p in self.pools])
