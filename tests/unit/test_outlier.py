"""Per-worker circuit breaking (outlier detection), on a fake clock."""

from __future__ import annotations

import pytest

from kvmesh.core.resilience_config import OutlierConfig
from kvmesh.gateway.outlier import OutlierDetector

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def detector(**kw: float) -> tuple[OutlierDetector, Clock]:
    clock = Clock()
    config = OutlierConfig(**{"consecutive_failures": 3, "base_ejection_s": 5.0,
                              "max_ejection_s": 12.0, **kw})
    return OutlierDetector(config, clock), clock


def test_consecutive_failures_eject_for_a_backoff() -> None:
    d, clock = detector()
    assert [d.failure("w", 4) for _ in range(3)] == [False, False, True]
    assert d.ejected() == ["w"] and d.ejection_s("w") == 5.0
    clock.now += 4.9
    assert d.ejected() == ["w"]
    clock.now += 0.2
    assert d.ejected() == []  # the ejection ended: the next call is its trial


def test_a_success_resets_the_count() -> None:
    d, _ = detector()
    d.failure("w", 4)
    d.failure("w", 4)
    d.success("w")
    assert [d.failure("w", 4) for _ in range(2)] == [False, False]
    assert d.ejected() == []


def test_ejections_grow_to_the_cap_and_decay_while_healthy() -> None:
    d, clock = detector()
    lengths = []
    for _ in range(4):
        for _ in range(3):
            d.failure("w", 4)
        lengths.append(d.ejection_s("w"))
        clock.now += 20
    assert lengths == [5.0, 10.0, 12.0, 12.0]  # base × n, capped at max_ejection_s
    d.success("w")  # healthy for a whole period since the last ejection: one less
    for _ in range(3):
        d.failure("w", 4)
    assert d.ejection_s("w") == 12.0  # 4 - 1 + 1 = 4 ejections: still capped
    clock.now += 20
    for _ in range(4):
        clock.now += 6
        d.success("w")
    for _ in range(3):
        d.failure("w", 4)
    assert d.ejection_s("w") == 5.0


def test_never_more_than_the_share_of_workers_ejected() -> None:
    d, _ = detector(max_ejection_percent=50)
    for worker in ("a", "b"):
        for _ in range(3):
            d.failure(worker, 2)
    assert d.ejected() == ["a"]  # 50% of 2 workers: one
    d1, _ = detector(max_ejection_percent=10)
    for _ in range(3):
        d1.failure("a", 2)
    assert d1.ejected() == ["a"]  # at least one may always be ejected


def test_zero_turns_ejection_off() -> None:
    d, _ = detector(consecutive_failures=0)
    assert not any(d.failure("w", 2) for _ in range(10)) and d.ejected() == []


def test_a_failed_trial_after_an_ejection_ejects_again_at_once() -> None:
    d, clock = detector()
    for _ in range(3):
        d.failure("w", 4)
    clock.now += 5
    assert d.ejected() == []
    assert d.failure("w", 4)  # the trial call failed: half-open → open, for 2 × base
    assert d.ejection_s("w") == 10.0
    clock.now += 10
    d.success("w")  # the trial succeeded: closed; it takes a run of failures again
    assert [d.failure("w", 4) for _ in range(3)] == [False, False, True]
