import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmesh.core.errors import NoWorkerAvailableError
from kvmesh.router.policy.base import RouteContext, pick
from kvmesh.router.policy.factory import POLICY_NAMES, make_policy
from kvmesh.router.policy.power_of_two import PowerOfTwoPolicy
from kvmesh.router.policy.round_robin import RoundRobinPolicy
from kvmesh.router.registry import WorkerLoadView, WorkerState

pytestmark = pytest.mark.unit


def worker(i: int, running: int = 0, model: str = "m") -> WorkerState:
    w = WorkerState(worker_id=f"w{i}", endpoint=f"127.0.0.1:{1000 + i}", model=model)
    w.load = WorkerLoadView(num_running=running)
    return w


CTX = RouteContext(request_id="r", model="m")


def test_round_robin_cycles_in_order() -> None:
    policy = RoundRobinPolicy()
    workers = [worker(i) for i in range(3)]
    chosen = [policy.choose(CTX, workers).worker.worker_id for _ in range(6)]
    assert chosen == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_round_robin_counts_per_model() -> None:
    policy = RoundRobinPolicy()
    a = [worker(0), worker(1)]
    other = RouteContext(request_id="r", model="other")
    assert policy.choose(CTX, a).worker.worker_id == "w0"
    assert policy.choose(other, a).worker.worker_id == "w0"
    assert policy.choose(CTX, a).worker.worker_id == "w1"


def test_power_of_two_never_picks_the_most_loaded_of_two() -> None:
    policy = PowerOfTwoPolicy(random.Random(0))
    workers = [worker(0, running=5), worker(1, running=0)]
    for _ in range(50):
        assert policy.choose(CTX, workers).worker.worker_id == "w1"


def test_power_of_two_counts_router_in_flight() -> None:
    policy = PowerOfTwoPolicy(random.Random(1))
    busy, idle = worker(0), worker(1)
    busy.in_flight.update({"a", "b"})
    for _ in range(20):
        assert policy.choose(CTX, [busy, idle]).worker is idle


@given(st.lists(st.integers(min_value=0, max_value=100), min_size=2, max_size=16),
       st.integers(min_value=0, max_value=2**16))
def test_power_of_two_never_picks_the_unique_maximum(loads: list[int], seed: int) -> None:
    policy = PowerOfTwoPolicy(random.Random(seed))
    workers = [worker(i, running=n) for i, n in enumerate(loads)]
    top = max(loads)
    chosen = policy.choose(CTX, workers).worker
    if loads.count(top) == 1:
        assert chosen.load.num_running != top


def test_power_of_two_spreads_equal_load() -> None:
    policy = make_policy("power_of_two", seed=3)
    workers = [worker(i) for i in range(4)]
    counts = Counter(policy.choose(CTX, workers).worker.worker_id for _ in range(400))
    assert set(counts) == {"w0", "w1", "w2", "w3"}


def test_single_candidate_and_empty_pool() -> None:
    policy = make_policy("power_of_two", seed=0)
    assert pick(policy, CTX, [worker(7)]).worker.worker_id == "w7"
    with pytest.raises(NoWorkerAvailableError):
        pick(policy, CTX, [])


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_configured_name_builds_that_policy_with_every_hook(name: str) -> None:
    """The config's PolicyName is the one list of names: each builds a policy that
    answers to it and carries the hooks callers use instead of testing its type."""
    policy = make_policy(name, seed=0)
    assert policy.name == name
    workers = [worker(0), worker(1)]
    ctx = RouteContext(request_id="r", model="m", token_ids=tuple(range(64)))
    assert isinstance(policy.cached_tokens(ctx, workers), dict)  # no side effects: empty
    assert pick(policy, ctx, workers).worker in workers
    policy.finished("r")
