"""From a mesh's models to one ``WorkerConfig`` per worker actor (pure: no Ray here).

Each model's pool is the mesh's worker template with the model's source and id, the
role's engine settings, the model's routing policy and Ray resources, and a CPU
binding: generative workers get disjoint core slices (round-robin, one core each, when
they outnumber the cores); embedding workers share every core, since an embedding
forward pass is short and bursty.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmesh.core.config import EngineConfig, WorkerConfig
from kvmesh.core.errors import InvalidRequestError
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.model_config import ModelConfig
from kvmesh.core.roles import WorkerRole
from kvmesh.worker.engine_args import cpu_binding


@dataclass(frozen=True)
class Pool:
    """One model's workers, as planned."""

    model: ModelConfig
    workers: list[WorkerConfig]


@dataclass(frozen=True)
class Cores:
    """Which cores a generative worker binds: ``index`` of ``count`` on ``ncpus``."""

    index: int
    count: int
    ncpus: int

    def binding(self) -> str:
        return cpu_binding(self.index, self.count, self.ncpus)


def _worker(template: WorkerConfig, model: ModelConfig, router: str, run_dir: Path,
            name: str, role: WorkerRole, engine: EngineConfig, cpus: float,
            cores: Cores | None) -> WorkerConfig:
    """The template with one worker's name, role, engine, resources and cores.

    ``model_copy`` does not validate, so every value here is of the field's type (a role
    given as a string would warn when the config is serialised for the actor)."""
    res = model.resources
    update: dict[str, Any] = {
        "router": router,
        "run_dir": run_dir,
        "worker_id": template.worker_id and f"{template.worker_id}-{name}",
        "role": role,
        "engine": engine,
        "routing_policy": model.policy,
        "num_cpus": res.num_cpus if res.num_cpus is not None else cpus,
        "num_gpus": res.num_gpus if res.num_gpus is not None else template.num_gpus,
        "resources": dict(res.resources if res.resources is not None else template.resources),
    }
    if template.cpu_bind is None:
        # Embedding workers (cores None) share every core.
        update["cpu_bind"] = (cores or Cores(0, 1, os.cpu_count() or 1)).binding()
    return template.model_copy(update=update)


def plan_pools(config: MeshConfig, router: str, run_dir: Path,
               ncpus: int | None = None) -> list[Pool]:
    """The pools the mesh starts with, model by model (``MeshConfig.model_configs``).

    A worker without ``resources.num_cpus`` reserves the template's num_cpus capped at an
    equal share of the CPUs the models that give ``num_cpus`` leave, so every actor fits
    when workers outnumber cores."""
    ncpus = ncpus or (os.cpu_count() or 1)
    models = config.model_configs()
    generative = sum(m.workers.total() for m in models if not m.pooling)
    share = cpu_share(config, ncpus)
    pools, index = [], 0
    for k, model in enumerate(models):
        workers = []
        for i, (role, engine) in enumerate(model.role_engines(config.worker.engine)):
            cores = None if model.pooling else Cores(index, generative, ncpus)
            index += 0 if model.pooling else 1
            name = f"emb-{i}" if model.pooling else f"{model.model_id or k}-{i}"
            workers.append(_worker(config.worker, model, router, run_dir, name, role,
                                   engine, share, cores))
        pools.append(Pool(model, workers))
    return pools


def with_ranks(config: MeshConfig, pools: list[Pool], ports: Callable[[], int],
               ncpus: int | None = None) -> list[list[WorkerConfig]]:
    """Each pool's actors: a data-parallel worker as one per rank (``placement.dp_ranks``:
    each rank an engine of its own), and, unless the template binds cores itself, every
    generative actor on a core slice of its own."""
    from kvmesh.launch.placement import with_dp_ranks

    ncpus = ncpus or (os.cpu_count() or 1)
    out = [with_dp_ranks(p.workers, ports) for p in pools]
    if config.worker.cpu_bind is not None:
        return out
    generative = [w for p, ws in zip(pools, out, strict=True) if not p.model.pooling
                  for w in ws]
    slots = {id(w): i for i, w in enumerate(generative)}
    return [[w.model_copy(update={"cpu_bind": Cores(slots[id(w)], len(generative),
                                                    ncpus).binding()})
             if id(w) in slots else w for w in ws] for ws in out]


def most_workers(config: MeshConfig, model: ModelConfig) -> int:
    """Workers ``model`` may have: its count, or with the router's autoscale on, every
    role it runs at its largest (``AutoscaleConfig.bounds``)."""
    scale = config.router.autoscale
    counts = model.workers
    if not scale.enabled or model.pooling:
        return counts.total()
    model_id = model.model_id or ""
    return sum(max(n, scale.bounds(model_id, role)[1]) for role, n in
               (("both", counts.both), ("prefill", counts.prefill), ("decode", counts.decode))
               if n)


def cpu_share(config: MeshConfig, ncpus: int) -> float:
    """Ray CPUs of a worker without ``resources.num_cpus``: the template's, capped at an
    equal share of what the models that give ``num_cpus`` leave (every pool counted at
    its largest when the router autoscales, so workers it adds fit too)."""
    models = config.model_configs()
    sized = [m for m in models if m.resources.num_cpus is not None]
    left = ncpus - sum(most_workers(config, m) * (m.resources.num_cpus or 0.0) for m in sized)
    unsized = sum(most_workers(config, m) for m in models if m.resources.num_cpus is None)
    return min(config.worker.num_cpus, max(left, 0.0) / max(unsized, 1))


def scaled_worker(config: MeshConfig, model: ModelConfig, router: str, run_dir: Path,
                  role: WorkerRole, index: int, ncpus: int | None = None) -> WorkerConfig:
    """The ``index``-th worker the autoscaler adds to ``model``'s ``role`` pool: the
    role's engine, the planned CPU share, cores round-robin over the pool's largest."""
    ncpus = ncpus or (os.cpu_count() or 1)
    engine = next(e for r, e in model.role_engines(config.worker.engine) if r == role)
    most = max(most_workers(config, model), 1)
    return _worker(config.worker, model, router, run_dir,
                   f"{model.model_id or 'model'}-{role.value}-s{index}", role, engine,
                   cpu_share(config, ncpus), Cores(index % most, most, ncpus))


def plan_added_pool(config: MeshConfig, model: ModelConfig, router: str, run_dir: Path,
                    free_cpus: float, bound: int, ncpus: int | None = None) -> Pool:
    """The pool of a model added while the mesh runs.

    The running workers hold their CPUs, so a worker without ``resources.num_cpus``
    reserves an equal share of the CPUs still free (capped at the template's); its
    cores continue the round-robin after the ``bound`` generative workers running."""
    ncpus = ncpus or (os.cpu_count() or 1)
    roles = model.role_engines(config.worker.engine)
    share = min(config.worker.num_cpus, max(free_cpus, 0.0) / len(roles))
    workers = []
    for i, (role, engine) in enumerate(roles):
        # A count above ncpus binds one core each, round-robin.
        cores = None if model.pooling else Cores(bound + i, ncpus + 1, ncpus)
        workers.append(_worker(config.worker, model, router, run_dir,
                               f"{model.model_id or 'added'}-{i}", role, engine, share, cores))
    return Pool(model, workers)


def check_cpus(workers: list[WorkerConfig], available: float, where: str) -> None:
    """Fail at once when the workers ask for more Ray CPUs than ``available`` (instead
    of waiting for the start timeout on actors Ray can never schedule)."""
    asked = sum(w.num_cpus for w in workers)
    if asked > available + 1e-9:
        raise InvalidRequestError(
            f"the workers ask for {asked:g} Ray CPUs (resources.num_cpus), {where} has "
            f"{available:g}", param="resources.num_cpus")

