"""Gang placement of a mesh's worker actors on a Ray cluster.

With ``MeshConfig.placement`` set, every worker (its CPUs, GPUs and custom resources)
is one bundle of a single Ray placement group, reserved before any actor starts: the
cluster either fits the whole mesh (on few nodes with PACK, over many with SPREAD) or
the start fails at once with what was asked, instead of leaving half a mesh waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Actor options that put worker ``index`` into its bundle of ``group``."""
    if group is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=index)}


def release(group: Any) -> None:
    if group is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)
