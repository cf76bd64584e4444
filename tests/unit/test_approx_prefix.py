import random

import pytest

from kvmesh.router.policy.approx_prefix import ApproxPrefixPolicy, ApproxPrefixTree
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.policy.factory import make_policy
from kvmesh.router.registry import WorkerState

pytestmark = pytest.mark.unit


def worker(wid: str) -> WorkerState:
    return WorkerState(worker_id=wid, endpoint=wid, model="m")


def test_tree_match_insert_and_lru_eviction() -> None:
    tree = ApproxPrefixTree(max_tokens_per_tenant=6)
    tree.insert([1, 2, 3, 4], "a")
    tree.insert([1, 2, 9], "b")
    assert tree.match([1, 2, 3, 4, 5], ["a", "b"]) == (4, ["a"])
    assert tree.match([1, 2, 7], ["a", "b"]) == (2, ["a", "b"])
    tree.insert([5, 6, 7], "a")  # 7 tokens > 6: a's least recently used leaf goes
    assert tree.size["a"] == 6
    assert tree.match([1, 2, 3, 4], ["a"])[0] == 3
    tree.remove_tenant("b")
    assert tree.match([1, 2, 9], ["b"]) == (0, [])


def test_policy_follows_its_own_routing_history() -> None:
    policy = ApproxPrefixPolicy(random.Random(0))
    workers = [worker("a"), worker("b")]
    prompt = list(range(100))
    first = policy.choose(RouteContext("r1", "m", token_ids=prompt), workers)
    assert first.reason == "approx_prefix:smallest_tree"
    again = policy.choose(RouteContext("r2", "m", token_ids=prompt[:90] + [7] * 10), workers)
    assert again.worker is first.worker and again.reason == "approx_prefix:match"
    other = policy.choose(RouteContext("r3", "m", token_ids=list(range(500, 600))), workers)
    assert other.worker is not first.worker  # the smaller tree takes new prefixes


def test_imbalance_falls_back_to_power_of_two() -> None:
    policy = ApproxPrefixPolicy(random.Random(0), imbalanced_threshold=2)
    busy, idle = worker("a"), worker("b")
    prompt = list(range(50))
    policy.tree.insert(prompt, "a")
    busy.in_flight.update({"1", "2", "3"})
    choice = policy.choose(RouteContext("r", "m", token_ids=prompt), [busy, idle])
    assert choice.worker is idle and choice.reason == "approx_prefix:imbalanced"


def test_registered_name() -> None:
    assert make_policy("approx_prefix").name == "approx_prefix"
