"""Gang placement of a mesh's worker actors on a Ray cluster.

With ``MeshConfig.placement`` set, every worker (its CPUs, GPUs and custom resources)
is one bundle of a single Ray placement group, reserved before any actor starts: the
cluster either fits the whole mesh (on few nodes with PACK, over many with SPREAD) or
the start fails at once with what was asked, instead of leaving half a mesh waiting.

A worker whose engine sets ``data_parallel_size`` > 1 becomes that many rank actors in a
placement group of their own (the engine's ``data_parallel_strategy``): a DP gang.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvmesh.core.config import WorkerConfig


class PlacementError(RuntimeError):
    """The cluster cannot hold the mesh's placement group."""


def bundle(config: WorkerConfig) -> dict[str, float]:
    """What one worker actor reserves, as a placement-group bundle."""
    wanted = {"CPU": config.num_cpus, "GPU": config.num_gpus, **config.resources}
    return {name: amount for name, amount in wanted.items() if amount > 0}


def reserve(configs: Sequence[WorkerConfig], strategy: str, timeout_s: float,
            name: str = "kvmesh-workers") -> Any:
    """A ready placement group with one bundle per worker (None for ``none``)."""
    if strategy == "none" or not configs:
        return None
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [bundle(c) for c in configs]
    group = placement_group(bundles, strategy=strategy, name=name)
    import ray

    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(
            f"the Ray cluster cannot place {len(bundles)} worker(s) {strategy} "
            f"(bundles {bundles}) within {timeout_s:.0f}s; available: "
            f"{ray.available_resources()}")
    return group


def scheduling(group: Any, index: int) -> dict[str, Any]:
    """Actor options for the ``index``-th bundle of ``group`` (a placement group, a
    ``Placement`` or None)."""
    if isinstance(group, Placement):
        return group.scheduling(index)
    return _bundle_options(group, index)


def _bundle_options(group: Any, index: int) -> dict[str, Any]:
    """Actor options that put worker ``index`` into its bundle of ``group``."""
    if group is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=index)}


def release(group: Any) -> None:
    """Free a placement group (or every group of a ``Placement``)."""
    if isinstance(group, Placement):
        group.release()
    elif group is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)


# ---- data-parallel gangs ---------------------------------------------------------------
def dp_ranks(config: WorkerConfig, ports: Callable[[], int]) -> list[WorkerConfig]:
    """A worker whose engine sets ``data_parallel_size`` > 1, as one WorkerConfig per
    rank: its rank, the gang's name and meeting ports (``ports`` gives free ones where
    the engine config leaves them 0), worker id ``<id>-dp<rank>``. Others unchanged."""
    engine = config.engine
    if engine.data_parallel_size <= 1:
        return [config]
    rpc = engine.data_parallel_rpc_port or ports()
    master = engine.data_parallel_master_port or ports()
    base = config.worker_id or f"{engine.served_model_name or 'dp'}-{master}"
    group = engine.data_parallel_group or base
    return [config.model_copy(update={
        "worker_id": f"{base}-dp{rank}",
        "engine": engine.model_copy(update={
            "data_parallel_rank": rank, "data_parallel_rpc_port": rpc,
            "data_parallel_master_port": master, "data_parallel_group": group}),
    }) for rank in range(engine.data_parallel_size)]


def with_dp_ranks(configs: Sequence[WorkerConfig], ports: Callable[[], int]
                  ) -> list[WorkerConfig]:
    """Every DP worker replaced by its ranks, in order."""
    return [rank for config in configs for rank in dp_ranks(config, ports)]


def reserve_gang(ranks: Sequence[WorkerConfig], timeout_s: float) -> Any:
    """One ready placement group holding every rank of a DP gang (its engine's
    ``data_parallel_strategy``): the gang starts whole or not at all."""
    strategy = ranks[0].engine.data_parallel_strategy
    return reserve(ranks, strategy, timeout_s, name=ranks[0].engine.data_parallel_group)


class Placement:
    """Where each of a mesh's worker actors goes: the DP ranks into their gang's own
    placement group (one per gang), the others into the mesh's group (``strategy``,
    or none)."""

    def __init__(self, configs: Sequence[WorkerConfig], strategy: str,
                 timeout_s: float) -> None:
        self.groups: list[Any] = []
        self._where: list[tuple[Any, int]] = []
        solo = [c for c in configs if not c.engine.data_parallel_group]
        gangs: dict[str, list[WorkerConfig]] = {}
        for c in configs:
            if c.engine.data_parallel_group:
                gangs.setdefault(c.engine.data_parallel_group, []).append(c)
        try:
            mesh = reserve(solo, strategy, timeout_s)
            self.groups.append(mesh)
            by_gang = {name: reserve_gang(ranks, timeout_s) for name, ranks in gangs.items()}
            self.groups.extend(by_gang.values())
        except PlacementError:
            self.release()
            raise
        seen: dict[str, int] = {}
        solo_index = 0
        for c in configs:
            name = c.engine.data_parallel_group
            if name:
                self._where.append((by_gang[name], seen.get(name, 0)))
                seen[name] = seen.get(name, 0) + 1
            else:
                self._where.append((mesh, solo_index))
                solo_index += 1

    def scheduling(self, index: int) -> dict[str, Any]:
        """Actor options for the ``index``-th config."""
        group, bundle_index = self._where[index]
        return _bundle_options(group, bundle_index)

    def release(self) -> None:
        for group in self.groups:
            release(group)
        self.groups = []
