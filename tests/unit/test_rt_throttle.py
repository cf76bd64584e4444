"""The router benchmark says when real-time scheduling (``chrt -f``) put the kernel's
real-time cap into its latency tail (Linux parks a real-time task past
sched_rt_runtime_us of each sched_rt_period_us: 950 ms of each second by default)."""

import os
from pathlib import Path

import pytest

from kvmesh.bench.router_rpc import rt_throttle_warning

pytestmark = pytest.mark.unit


def report(*busy: float) -> dict:
    return {"fleets": [{"runs": [{"saturated": {"router_busy": b},
                                  "at_fixed_rate": {"router_busy": 0.5}}]}
                       for b in busy]}


def test_a_router_at_the_real_time_cap_is_flagged(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_FIFO)
    kernel = Path("/proc/sys/kernel")
    cap = int((kernel / "sched_rt_runtime_us").read_text()) / \
        int((kernel / "sched_rt_period_us").read_text())
    if cap >= 1.0 or cap < 0:
        pytest.skip("this kernel does not cap real-time tasks")
    assert "real-time scheduling" in rt_throttle_warning(report(0.6, cap))
    assert rt_throttle_warning(report(0.6, cap - 0.2)) == ""


def test_normal_scheduling_is_never_flagged(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_OTHER)
    assert rt_throttle_warning(report(1.0)) == ""
