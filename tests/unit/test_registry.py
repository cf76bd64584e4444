import pytest

from kvmesh.core.config import RouterConfig
from kvmesh.core.errors import WorkerNotFoundError
from kvmesh.router.core import RouterCore
from kvmesh.router.registry import WorkerRegistry, WorkerState

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(wid: str, model: str = "m", role: str = "both", adapters: tuple[str, ...] = ()):
    return WorkerState(worker_id=wid, endpoint=wid, model=model, role=role, adapters=adapters)


def test_lease_expiry_and_touch() -> None:
    clock = Clock()
    reg = WorkerRegistry(lease_ttl_s=10, clock=clock)
    reg.upsert(state("a"))
    reg.upsert(state("b"))
    clock.now += 8
    assert reg.touch("a")
    clock.now += 5
    assert reg.expire() == ["b"]
    assert [w.worker_id for w in reg.all()] == ["a"]
    assert not reg.touch("b")


def test_load_report_counts_as_liveness() -> None:
    clock = Clock()
    reg = WorkerRegistry(lease_ttl_s=10, clock=clock)
    reg.upsert(state("a"))
    clock.now += 9
    reg.report_load("a", 2, 1, 0.5)
    clock.now += 9
    assert reg.expire() == []
    assert reg.get("a").active == 3


def test_candidates_filter_model_role_adapter_and_exclusions() -> None:
    reg = WorkerRegistry(lease_ttl_s=10)
    reg.upsert(state("p", role="prefill"))
    reg.upsert(state("d", role="decode"))
    reg.upsert(state("b", adapters=("sql",)))
    reg.upsert(state("x", model="other"))
    assert [w.worker_id for w in reg.candidates("m")] == ["b", "d"]
    assert [w.worker_id for w in reg.candidates("m", adapter="sql")] == ["b"]
    assert [w.worker_id for w in reg.candidates("m", exclude=["b"])] == ["d"]
    assert reg.models() == ["m", "other"]


def test_in_flight_survives_reregistration_and_version_bumps() -> None:
    reg = WorkerRegistry(lease_ttl_s=10)
    reg.upsert(state("a"))
    v = reg.version
    reg.routed("a", "r1")
    reg.upsert(state("a"))
    assert reg.get("a").in_flight == {"r1"}
    assert reg.version == v + 1
    reg.finished("a", "r1")
    assert reg.get("a").active == 0
    assert reg.remove("a") and not reg.remove("a")
    with pytest.raises(WorkerNotFoundError):
        reg.get("a")


def test_core_heartbeats_and_lists_workers_with_their_ages() -> None:
    """What Heartbeat and ListWorkers answer comes from the core, not the servicer."""
    core = RouterCore(RouterConfig(metrics_port=None, seed=0))
    core.add_worker(state("b", model="m"))
    core.add_worker(state("a", model="m"))
    core.add_worker(state("c", model="other"))
    assert core.heartbeat("a") == (True, False) and core.heartbeat("gone") == (False, False)
    core.report_load("b", 1, 0, 0.5, 0, None)
    rows = core.statuses("m")
    assert [r.worker.worker_id for r in rows] == ["a", "b"]
    a, b = rows
    assert a.load_age_s == -1.0  # never reported
    assert 0 <= b.load_age_s < 5 and 0 <= a.last_seen_age_s < 5
    assert a.indexed_blocks == b.indexed_blocks == 0
    assert [r.worker.worker_id for r in core.statuses()] == ["a", "b", "c"]


def test_a_draining_worker_is_no_candidate_but_stays_registered() -> None:
    reg = WorkerRegistry(lease_ttl_s=10)
    reg.upsert(state("a"))
    reg.upsert(state("b"))
    before = reg.version
    drained = reg.drain("a")
    assert drained is not None and drained.draining and reg.version == before + 1
    assert reg.drain("a") is drained and reg.version == before + 1  # no change twice
    assert [w.worker_id for w in reg.candidates("m")] == ["b"]
    assert {w.worker_id for w in reg.all()} == {"a", "b"}
    assert reg.drain("nobody") is None


async def test_core_drains_a_worker_and_reports_what_it_still_has() -> None:
    core = RouterCore(RouterConfig(metrics_port=None))
    core.add_worker(state("a"))
    core.registry.routed("a", "r1")
    assert await core.drain_worker("a") == (True, 1)
    assert await core.drain_worker("zz") == (False, 0)
    version, workers = await core.next_worker_set(-1)
    assert [(w.worker_id, w.draining) for w in workers] == [("a", True)]


def test_roles_follow_the_worker_set() -> None:
    """``roles`` is kept between changes (the router asks it on every route to skip
    the P/D pools when there are none) and must not go stale when one registers."""
    reg = WorkerRegistry(lease_ttl_s=10)
    reg.upsert(state("a"))
    assert reg.roles() == {"both"}
    reg.upsert(state("p", role="prefill"))
    reg.upsert(state("d", role="decode"))
    assert reg.roles() == {"both", "prefill", "decode"}
    reg.remove("p")
    assert reg.roles() == {"both", "decode"}
