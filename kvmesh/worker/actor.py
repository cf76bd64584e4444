"""Workers as Ray actors: one actor per engine, with fractional CPU/GPU resources."""

from __future__ import annotations

import logging
import os
from typing import Any

from kvmesh.core.config import WorkerConfig
from kvmesh.core.malloc_tuning import ENV as MALLOC_ENV
from kvmesh.core.security_config import REVEAL_SECRETS

log = logging.getLogger(__name__)


def ray_env() -> dict[str, str]:
    """Environment for a local, loopback-only, no-telemetry Ray."""
    return {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class _LauncherOwnsSigterm(logging.Filter):
    """``kvmesh up`` starts Ray from a worker thread and stops everything itself on
    SIGTERM/SIGINT (in order), so Ray not installing its own handler (which would
    ``sys.exit`` mid-shutdown) is intended: its warning about it is not the user's
    business."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def init_ray(
    address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True
) -> None:
    """Join ``address`` or start a local Ray bound to 127.0.0.1 (idempotent)."""
    os.environ.update(ray_env())
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray._private.worker").addFilter(_LauncherOwnsSigterm())
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # "local": always a fresh instance of our own, never a cluster that `ray start`
        # left registered on this machine (ray.init() alone would attach to it).
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
            log_to_driver=log_to_driver,
        )


class WorkerActor:
    """Hosts a :class:`~kvmesh.worker.worker.WorkerServer` on the actor's event loop."""

    def __init__(self, config_json: str) -> None:
        from kvmesh.core.logs import setup_logging
        from kvmesh.core.tracing import setup_tracing

        self._config = WorkerConfig.model_validate_json(config_json)
        setup_logging("worker", json_format=self._config.logging.json_format)
        setup_tracing(self._config.tracing, "worker")
        self._worker: Any = None

    def where(self) -> dict[str, Any]:
        """This actor's PID and the files its output (and its engine's) goes to: what
        the launcher shows of a worker that does not start in time."""
        logs = []
        for fd in (1, 2):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if path.startswith("/") and path not in logs:
                logs.append(path)
        return {"pid": os.getpid(), "logs": logs}

    async def start(self) -> dict[str, Any]:
        from kvmesh.worker.worker import WorkerServer

        self._worker = WorkerServer(self._config)
        info = await self._worker.start()
        info["pid"] = os.getpid()
        # What Ray granted this actor (CPU, GPU, custom resources; fractions kept).
        import ray

        info["resources"] = ray.get_runtime_context().get_assigned_resources()
        return info

    async def stop(self) -> bool:
        from kvmesh.core.tracing import shutdown_tracing

        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        shutdown_tracing()
        return True


def spawn_worker_actor(config: WorkerConfig, name: str | None = None,
                       placement: dict[str, Any] | None = None) -> Any:
    """Create (not start) a worker actor; call ``.start.remote()`` on the handle.
    ``placement``: its placement-group scheduling options, if the mesh has a group."""
    import ray

    cls = ray.remote(WorkerActor)
    options: dict[str, Any] = {
        "num_cpus": config.num_cpus,
        "num_gpus": config.num_gpus,
        "resources": dict(config.resources),
        **(placement or {}),
        "max_concurrency": 1000,
        # Offline unless the caller says otherwise: a hub model is fetched by whoever
        # starts the actor (`kvmesh up`), or by the actor when HF_HUB_OFFLINE=0 is set.
        # The allocator opt-out reaches an actor on a cluster this process did not start.
        "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                     **ray_env(),
                                     **({MALLOC_ENV: os.environ[MALLOC_ENV]}
                                        if MALLOC_ENV in os.environ else {})}},
    }
    if name:
        options["name"] = name
    return cls.options(**options).remote(config.model_dump_json(context=REVEAL_SECRETS))
