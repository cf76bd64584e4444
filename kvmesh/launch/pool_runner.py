"""Start and stop one model's worker pool as Ray actors (the shell around ``pools``).

A running pool is its model config, the served id, the actors and what each reported
at start (endpoint, role, pid, the Ray resources it was granted). A pool added while the
mesh runs may hold a placement group of its own; the pools the mesh starts with share
the mesh's group (``MeshConfig.placement``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from kvmesh.core.config import WorkerConfig
from kvmesh.core.model_config import ModelConfig
from kvmesh.launch import placement

log = logging.getLogger(__name__)

#: Seconds a worker gets to drain (its drain_timeout_s, 30 by default), deregister and
#: shut its engine down before it is killed.
STOP_TIMEOUT_S = 45.0


@dataclass
class RunningPool:
    model: ModelConfig
    model_id: str
    actors: list[Any]
    workers: list[dict[str, Any]]
    #: The pool's own placement group (a model added while running), or None.
    group: Any = None
    pids: list[int] = field(default_factory=list)

    @property
    def pooling(self) -> bool:
        return self.model.pooling

    def summary(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "embedding": self.pooling,
                "config": self.model.model_dump(mode="json", exclude_unset=True),
                "workers": self.workers}


async def start_actors(configs: list[WorkerConfig], group: Any, first_bundle: int,
                       timeout_s: float) -> tuple[list[Any], list[dict[str, Any]]]:
    """Spawn one actor per config (in ``group``'s bundles from ``first_bundle`` on) and
    start them all; on any failure every one of them is stopped again."""
    from kvmesh.worker.actor import spawn_worker_actor

    actors = [spawn_worker_actor(c, placement=placement.scheduling(group, first_bundle + i))
              for i, c in enumerate(configs)]
    try:
        infos = await asyncio.wait_for(
            asyncio.gather(*[a.start.remote() for a in actors]), timeout=timeout_s)
    except BaseException:
        await stop_actors(actors)
        raise
    return actors, list(infos)


async def stop_actors(actors: list[Any]) -> None:
    """Ordered stop (deregister, engine shutdown), then kill: a dead or hung actor
    must not block the rest."""
    if not actors:
        return
    import ray

    async def stop(actor: Any) -> None:
        try:
            await asyncio.wait_for(actor.stop.remote(), timeout=STOP_TIMEOUT_S)
        except Exception as exc:
            log.warning("worker stop failed: %s", exc)
        ray.kill(actor)

    await asyncio.gather(*(stop(a) for a in actors))


async def stop_pool(pool: RunningPool) -> None:
    await stop_actors(pool.actors)
    pool.actors = []
    placement.release(pool.group)
    pool.group = None
