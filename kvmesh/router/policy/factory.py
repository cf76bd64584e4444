"""Build a routing policy by its configured name (``RouterConfig.policy``)."""

from __future__ import annotations

import random
from typing import get_args

from kvmesh.core.config import CostParams, PolicyName
from kvmesh.router.policy.approx_prefix import ApproxPrefixPolicy
from kvmesh.router.policy.base import Policy
from kvmesh.router.policy.kv_aware import KvAwarePolicy
from kvmesh.router.policy.power_of_two import PowerOfTwoPolicy
from kvmesh.router.policy.random import RandomPolicy
from kvmesh.router.policy.round_robin import RoundRobinPolicy
from kvmesh.router.prefix_index import PrefixIndex

POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)


def make_policy(
    name: str, seed: int | None = None, index: PrefixIndex | None = None,
    params: CostParams | None = None,
) -> Policy:
    rng = random.Random(seed)
    if name == "random":
        return RandomPolicy(rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    if name == "approx_prefix":
        return ApproxPrefixPolicy(rng)
    if name == "kv_aware":
        return KvAwarePolicy(index if index is not None else PrefixIndex(), rng, params)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
