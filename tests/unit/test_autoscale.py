"""The autoscaler's decision (pure): desired workers per pool from a load curve."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvmesh.core.autoscale_config import AutoscaleConfig
from kvmesh.router.autoscale import PoolLoad, PoolScaler, need

pytestmark = pytest.mark.unit
CFG = AutoscaleConfig(enabled=True, min_workers=1, max_workers=4,
                      target_requests_per_worker=8, scale_up_window_s=5,
                      scale_down_window_s=20, scale_up_cooldown_s=10,
                      scale_down_cooldown_s=15)


def load(requests: float, workers: int, queued: float = 0, kv: float = 0) -> PoolLoad:
    return PoolLoad(workers=workers, requests=requests, queued_prefill_tokens=queued,
                    kv_usage=kv)


def run(scaler: PoolScaler, curve: list[float], start: float = 0.0) -> list[int]:
    """One sample a second; the pool follows its desired count at once."""
    out, workers = [], scaler.desired or 1
    for i, requests in enumerate(curve):
        workers = scaler.observe(load(requests, workers), start + i)
        out.append(workers)
    return out


def test_need_is_the_largest_of_the_three_ratios() -> None:
    assert need(CFG, load(16, 1)) == 2
    assert need(CFG, load(0, 1, queued=3 * 8192)) == 3
    assert need(CFG, load(0, 2, kv=1.7)) == pytest.approx(2.0)


def test_a_load_curve_scales_one_to_four_and_back_to_one() -> None:
    scaler = PoolScaler(CFG, "m", "both")
    curve = [4] * 10 + [30] * 60 + [4] * 120
    desired = run(scaler, curve)
    assert desired[:10] == [1] * 10
    # Up as soon as the 5 s mean passes the tolerance, to what that mean needs; the
    # rest after one cooldown.
    assert desired[10:13] == [1, 2, 2]
    assert max(desired) == 4 and desired.index(4) <= 11 + 10
    # Down one worker at a time, each after the cooldown, only once the 20 s peak fits.
    drop = desired.index(3, desired.index(4))
    assert drop >= 70 + 19
    steps = [i for i in range(1, len(desired)) if desired[i] < desired[i - 1]]
    assert [desired[i] for i in steps] == [3, 2, 1]
    assert all(b - a >= 15 for a, b in zip(steps, steps[1:], strict=False))
    assert desired[-1] == 1


def test_no_flapping_inside_the_tolerance_or_over_short_spikes() -> None:
    scaler = PoolScaler(CFG, "m", "both")
    run(scaler, [16] * 30)  # settles on 2
    assert scaler.desired == 2
    # 17 requests on 2 workers: need 2.125, within 10 %: stays.
    assert run(scaler, [17] * 30, start=30)[-1] == 2
    # A 1 s dip to nothing does not scale down: the 20 s peak still needs 2.
    assert set(run(scaler, [16, 0, 16, 16] * 10, start=60)) == {2}


def test_bounds_hold_and_per_pool_bounds_win() -> None:
    cfg = AutoscaleConfig.model_validate({**CFG.model_dump(), "pools": {
        "m": {"min_workers": 2, "max_workers": 3},
        "m:prefill": {"min_workers": 0, "max_workers": 1}}})
    both = PoolScaler(cfg, "m", "both")
    assert both.observe(load(0, 1), 0) == 2  # raised to the minimum at once
    assert max(run(both, [100] * 30, start=1)) == 3
    assert PoolScaler(cfg, "m", "prefill").observe(load(100, 1), 0) == 1
    assert PoolScaler(cfg, "other", "both").bounds == (1, 4)


def test_wrong_bounds_fail_naming_them() -> None:
    with pytest.raises(ValidationError, match="min_workers"):
        AutoscaleConfig(min_workers=5, max_workers=2)
    with pytest.raises(ValidationError, match="extra"):
        AutoscaleConfig.model_validate({"max_worker": 3})


async def test_the_router_exports_each_pools_desired_count() -> None:
    from kvmesh.core.config import RouterConfig
    from kvmesh.router.core import RouterCore
    from kvmesh.router.lifecycle import WorkerLifecycle
    from kvmesh.router.registry import WorkerState
    from kvmesh.router.servicer import RouterServicer
    from kvmesh.v1 import router_pb2

    core = RouterCore(RouterConfig(metrics_port=None, autoscale=CFG))
    for wid, role in (("a", "both"), ("p", "prefill")):
        core.registry.upsert(WorkerState(worker_id=wid, endpoint=f"127.0.0.1:{ord(wid)}",
                                         model="m", role=role, block_size=32))
    for i in range(30):  # 30 requests in flight on the one aggregated worker
        core.registry.routed("a", f"r{i}", 0)
    for second in range(3):
        core.autoscale(float(second))
    reply = await RouterServicer(core, WorkerLifecycle(core)).ListWorkers(
        router_pb2.ListWorkersRequest(), None)
    pools = {(p.model, p.role): p for p in reply.pools}
    assert pools["m", "both"].workers == 1 and pools["m", "both"].desired == 4
    assert pools["m", "both"].need == pytest.approx(30 / 8)
    assert pools["m", "prefill"].desired == 1
    from prometheus_client import generate_latest

    text = generate_latest(core.metrics.registry).decode()
    assert 'kvmesh_router_desired_workers{model="m",role="both"} 4.0' in text
    # The pool's last worker leaving keeps the pool: idle, it comes down one worker per
    # cooldown to its minimum, which is asked for (a scaler starts one again).
    core.remove_worker("a")
    desired = [s.desired for t in range(100, 200, 5) for s in core.autoscale(float(t))
               if (s.model, s.role) == ("m", "both")]
    assert desired[0] == 3 and desired[-1] == 1 and sorted(desired, reverse=True) == desired
