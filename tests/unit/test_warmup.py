"""A restarted router waits for its snapshot's workers before it routes (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.router import snapshot
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.warmup import Warmup

pytestmark = pytest.mark.unit


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_warm_once_every_snapshotted_worker_is_back() -> None:
    warmup = Warmup(max_s=5, clock=Clock())
    assert warmup.missing([]) == []  # no snapshot: warm at once
    warmup.expect(["a", "b"])
    assert warmup.missing([]) == ["a", "b"]
    assert warmup.missing(["a"]) == ["b"]
    assert warmup.missing(["a", "b", "c"]) == []
    assert warmup.missing([]) == []  # warm stays warm


def test_warm_after_max_s_even_if_a_worker_never_returns() -> None:
    clock = Clock()
    warmup = Warmup(max_s=5, clock=clock)
    warmup.expect(["a", "dead"])
    assert warmup.missing(["a"]) == ["dead"]
    clock.now = 5.0
    assert warmup.missing(["a"]) == []


def test_snapshot_lists_workers_with_nothing_cached(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    snapshot.write(path, snapshot.capture({"idle": snapshot.empty_view()}, {"idle": 12.0}))
    restored = snapshot.read(path, 60)
    assert list(restored) == ["idle"] and restored["idle"].incarnation == 12.0
    assert snapshot.restore(PrefixIndex(), "idle", restored["idle"]) == 0
