"""The registry's load table: every change to a worker's load reaches its row, and the
decision's load arrays gathered from it equal the ones read worker by worker."""

import random

import numpy as np
import pytest

from kvmesh.router.cost_vector import load_arrays
from kvmesh.router.registry import WorkerRegistry, WorkerState

pytestmark = pytest.mark.unit


def _row(registry: WorkerRegistry, wid: str) -> dict[str, float]:
    w = registry.get(wid)
    t = registry.loads
    return {"running": t.running[w.row], "waiting": t.waiting[w.row],
            "uncached": t.uncached[w.row], "kv_usage": t.kv_usage[w.row],
            "routed": t.routed[w.row], "unreported": t.unreported[w.row]}


def _expected(w: WorkerState) -> dict[str, float]:
    return {"running": w.load.num_running, "waiting": w.load.num_waiting,
            "uncached": w.load.waiting_uncached_tokens, "kv_usage": w.load.kv_usage,
            "routed": len(w.in_flight), "unreported": w.unreported_prefill_tokens}


def test_every_change_reaches_the_row() -> None:
    registry = WorkerRegistry(lease_ttl_s=10)
    registry.upsert(WorkerState("a", "a:1", "m"))
    registry.upsert(WorkerState("b", "b:1", "m"))
    registry.report_load("a", 3, 2, 0.25, 700, 0.5)
    assert _row(registry, "a") == {"running": 3, "waiting": 2, "uncached": 700,
                                   "kv_usage": 0.25, "routed": 0, "unreported": 0}
    registry.routed("a", "r1", 400)
    registry.routed("a", "r2", 100)
    assert _row(registry, "a")["routed"] == 2 and _row(registry, "a")["unreported"] == 500
    registry.finished("a", "r1")
    assert _row(registry, "a")["routed"] == 1
    registry.report_load("a", 1, 0, 0.5, 0)  # a report folds the routed prefill in
    assert _row(registry, "a") == {"running": 1, "waiting": 0, "uncached": 0,
                                   "kv_usage": 0.5, "routed": 1, "unreported": 0}
    assert _row(registry, "b") == _expected(registry.get("b"))


def test_reregistration_keeps_the_row_and_removal_frees_it() -> None:
    registry = WorkerRegistry(lease_ttl_s=10)
    old = registry.upsert(WorkerState("a", "a:1", "m"))
    registry.routed("a", "r1", 300)
    registry.report_load("a", 4, 1, 0.1, 50)
    new = registry.upsert(WorkerState("a", "a:2", "m"))  # restarted: same id
    assert new.row == 0 and old.row == -1 and old.loads is None
    # In-flight accounting and the last report carry over; the new object's own
    # unreported prefill (none yet) is what it shows.
    assert _row(registry, "a") == {"running": 4, "waiting": 1, "uncached": 50,
                                   "kv_usage": 0.1, "routed": 1, "unreported": 0}
    registry.remove("a")
    assert new.row == -1 and len(registry.loads) == 0
    b = registry.upsert(WorkerState("b", "b:1", "m"))
    assert b.row == 0 and _row(registry, "b") == _expected(b)  # the row, reused and clean


def test_gathered_load_arrays_equal_the_per_worker_ones() -> None:
    """Random reports, routes, finishes, (re)registrations and removals over a growing
    fleet: the table's arrays stay equal to the ones read off the workers."""
    rng = random.Random(3)
    registry = WorkerRegistry(lease_ttl_s=10)
    ids = [f"w{i:03d}" for i in range(150)]  # past the table's first capacity
    for step in range(3000):
        wid = rng.choice(ids)
        op = rng.random()
        if op < 0.15 or wid not in {w.worker_id for w in registry.all()}:
            registry.upsert(WorkerState(wid, f"{wid}:{step}", "m"))
        elif op < 0.2:
            registry.remove(wid)
        elif op < 0.45:
            registry.report_load(wid, rng.randrange(20), rng.randrange(9),
                                 rng.random(), rng.randrange(4000))
        elif op < 0.75:
            registry.routed(wid, f"r{step}", rng.randrange(2000))
        else:
            held = registry.get(wid).in_flight
            registry.finished(wid, rng.choice(sorted(held)) if held else "none")
    workers = registry.candidates("m")
    assert len(workers) > 64
    assert workers[0].loads is registry.loads
    gathered = load_arrays(workers)
    # The same workers detached from the table: read one by one.
    detached = [WorkerState(w.worker_id, w.endpoint, w.model, load=w.load,
                            in_flight=set(w.in_flight),
                            unreported_prefill_tokens=w.unreported_prefill_tokens)
                for w in workers]
    assert detached[0].loads is None
    for got, want in zip(gathered, load_arrays(detached), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_worker_of_no_registry_reads_one_by_one() -> None:
    registry = WorkerRegistry(lease_ttl_s=10)
    inside = registry.upsert(WorkerState("a", "a:1", "m"))
    registry.report_load("a", 5, 0, 0.0)
    outside = WorkerState("b", "b:1", "m")
    assert registry.loads.rows([inside, outside]) is None
    assert load_arrays([inside, outside]).running.tolist() == [5.0, 0.0]


def test_a_kept_selection_sees_reports_made_after_it() -> None:
    """The registry keeps its candidate selection across decisions: the load read
    through it is the table's of now, not of when it was selected."""
    registry = WorkerRegistry(lease_ttl_s=10)
    for wid in ("a", "b"):
        registry.upsert(WorkerState(wid, f"{wid}:1", "m"))
    before = registry.candidates("m")
    assert load_arrays(before).running.tolist() == [0.0, 0.0]
    registry.report_load("b", 7, 2, 0.5, 900)
    registry.routed("a", "r1", 300)
    again = registry.candidates("m")
    assert again.rows is before.rows  # the same selection, kept
    arrays = load_arrays(again)
    assert arrays.running.tolist() == [1.0, 7.0]  # a: its routed request counts
    assert arrays.queued_prefill_tokens.tolist() == [300.0, 900.0]
