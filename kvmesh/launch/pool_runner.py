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
from pathlib import Path
from typing import Any

from kvmesh.core.config import WorkerConfig
from kvmesh.core.errors import ErrorKind, KvmeshError
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
    # Asked first (an actor runs one caller's calls in order): where each one's output
    # goes, before a start that may never return.
    where = [a.where.remote() for a in actors]
    starts = [asyncio.ensure_future(a.start.remote()) for a in actors]
    try:
        _, pending = await asyncio.wait(starts, timeout=timeout_s)
        if pending:
            late = [i for i, task in enumerate(starts) if task in pending]
            raise WorkerStartError(await _late_report(
                {i: configs[i] for i in late}, [where[i] for i in late], timeout_s))
        infos = [task.result() for task in starts]
    except BaseException:
        for task in starts:
            task.cancel()
        await stop_actors(actors)
        raise
    return actors, infos


class WorkerStartError(KvmeshError):
    """Workers did not report ready within the startup timeout (their logs' tails said):
    ``kvmesh up`` exits 1 with it; a model added at run time is refused UNAVAILABLE."""

    kind = ErrorKind.UNAVAILABLE


#: Lines of a late worker's log shown in the error.
LOG_TAIL_LINES = 30


async def _late_report(configs: dict[int, WorkerConfig], where: list[Any],
                       timeout_s: float) -> str:
    lines = [f"{len(configs)} worker(s) not ready after {timeout_s:.0f} s (startup_timeout_s):"]
    for (index, config), ref in zip(configs.items(), where, strict=True):
        name = f"worker {config.worker_id or index} ({config.role.value})"
        try:
            found = await asyncio.wait_for(ref, timeout=5)
        except Exception:  # never scheduled (no resources), or its process is wedged
            lines.append(f"- {name}: its actor never ran (see `ray status` for resources)")
            continue
        logs = found.get("logs", [])
        lines.append(f"- {name}: pid {found.get('pid')}, log {' '.join(logs) or '(none)'}")
        for path in logs:
            lines.extend(f"    {line}" for line in log_tail(Path(path), LOG_TAIL_LINES))
    return "\n".join(lines)


def log_tail(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a (possibly large, possibly missing) log file."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return [f"(unreadable: {exc})"]
    return text.splitlines()[-n:]


async def stop_actors(actors: list[Any]) -> None:
    """Ordered stop (deregister, engine shutdown), then kill: a dead or hung actor
    must not block the rest."""
    if not actors:
        return
    import ray

    async def stop(actor: Any) -> None:
        try:
            await asyncio.wait_for(actor.stop.remote(), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("a worker did not stop within %.0f s; killed", STOP_TIMEOUT_S)
        except Exception as exc:
            log.warning("worker stop failed: %s", exc)
        ray.kill(actor)

    await asyncio.gather(*(stop(a) for a in actors))


async def stop_pool(pool: RunningPool) -> None:
    await stop_actors(pool.actors)
    pool.actors = []
    placement.release(pool.group)
    pool.group = None
