"""The routing miss analysis: each avoidable miss put down to the rule that caused it
(simulated workers with the truth at hand, and a real run's decision log joined with
what vLLM reused), the router's decision log itself, and the closed-loop driver."""

import json
from pathlib import Path

import numpy as np
import pytest

import kvmesh.bench.routing.sim as sim
from kvmesh.bench.routing.misses import MissAnalysis, classify_logged, tally
from kvmesh.bench.routing.sim import SimParams, simulate
from kvmesh.bench.routing.workloads import make_workload
from kvmesh.core.config import CostParams, RouterConfig
from kvmesh.router import decision_log
from kvmesh.router.core import RouterCore
from kvmesh.router.cost_vector import LoadArrays
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.policy.kv_aware import Evaluation
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import router_pb2

pytestmark = pytest.mark.unit
BS = 32


def evaluation(cached: list[float], chosen: int, kept: list[int], near: list[int],
               queued: list[float] | None = None) -> Evaluation:
    n = len(cached)
    zeros = np.zeros(n)
    loads = LoadArrays(zeros, zeros, np.asarray(queued or [0.0] * n, float), zeros, zeros)
    return Evaluation(np.asarray(cached, float), loads, np.asarray(kept), np.zeros(len(kept)),
                      np.asarray(near), 1, chosen, {BS: np.zeros(0, np.uint64)})


def one(ev: Evaluation, truth: list[int], reused: int, later: list[int] | None = None,
        confirmed: list[int] | None = None) -> str | None:
    a = MissAnalysis(CostParams(), BS)
    a.decided("r", ev, 1000, truth, confirmed if confirmed is not None else truth)
    a.scheduled("r", reused, later if later is not None else truth)
    found = a.classify("r")
    return None if found is None else found[0]


def test_each_avoidable_miss_is_put_down_to_its_rule() -> None:
    # Reused what the best worker held: no miss.
    assert one(evaluation([640, 0], 0, [0, 1], [0]), [640, 0], 640) is None
    # The chosen held it at arrival and lost it before its prefill.
    assert one(evaluation([640, 0], 0, [0, 1], [0]), [640, 0], 0) == "evicted_while_queued"
    # The other worker held it and the router did not know yet.
    assert one(evaluation([0, 0], 0, [0, 1], [0, 1]), [0, 640], 0) == "index_behind"
    # The other worker got it after the decision.
    assert one(evaluation([0, 0], 0, [0, 1], [0]), [0, 0], 0, later=[0, 640]) == \
        "arrived_later"
    # The router counted blocks on the chosen worker that only pending marks claimed.
    assert one(evaluation([640, 640], 0, [0, 1], [0, 1]), [0, 640], 0,
               confirmed=[0, 640]) == "pending_unrealized"
    assert one(evaluation([640, 640], 0, [0, 1], [0, 1]), [0, 640], 0,
               confirmed=[640, 640]) == "stale_holder"
    # It knew: the holder was over the load bound, lost the home, or cost more.
    assert one(evaluation([0, 640], 0, [0], [0]), [0, 640], 0) == "bounded_load"
    assert one(evaluation([0, 640], 0, [0, 1], [0, 1]), [0, 640], 0) == "placement_home"
    assert one(evaluation([0, 640], 0, [0, 1], [0], queued=[0, 9000]), [0, 640], 0) == \
        "load:queued_prefill"


def test_a_logged_decision_is_explained_against_the_oracle() -> None:
    entry = {"block_size": BS, "chosen": 0, "view": [640, 0], "confirmed": [640, 0],
             "kept": [0, 1], "near": [0],
             "terms": {"0": dict.fromkeys(("queued_prefill", "backlog", "eviction",
                                           "running"), 0.0),
                       "1": {"queued_prefill": 5.0, "backlog": 0.0, "eviction": 0.0,
                             "running": 0.0}}}
    assert classify_logged(entry, 640, 640) is None
    assert classify_logged(entry, 0, 640) == ("evicted_or_stale", 640)
    assert classify_logged({**entry, "confirmed": [0, 0]}, 0, 640)[0] == "pending_unrealized"
    assert classify_logged({**entry, "view": [0, 0]}, 0, 640)[0] == "not_held"
    assert classify_logged({**entry, "view": [0, 640]}, 0, 640)[0] == "load:queued_prefill"
    summary = tally([("not_held", 640), None, ("not_held", 320)], 4000, 3)
    assert summary["avoidable_misses"] == 2
    assert summary["by_rule"] == {"not_held": {"requests": 2, "tokens": 960,
                                               "hit_rate_lost": 0.24}}


def test_the_simulated_analysis_accounts_for_kv_awares_shortfall() -> None:
    # Open loop above what two workers serve: queues long enough for evictions.
    workload = make_workload("prefix_repetition:12:512:64:16", 240, 20.0, 1)
    analysis = MissAnalysis(CostParams(), BS)
    result = simulate("kv_aware", workload, 2, SimParams(capacity_blocks=120), seed=1,
                      analysis=analysis)
    summary = analysis.summary()
    assert summary["requests"] == len(workload)
    # What the analysis says was lost is the gap between the best worker and kv_aware.
    assert summary["avoidable_misses"] > 0
    assert "evicted_while_queued" in summary["by_rule"]  # queues longer than the LRU
    assert result["hit_rate"] + summary["hit_rate_lost"] >= result["oracle_hit_rate"] - 1e-3


def test_the_closed_loop_keeps_exactly_concurrency_requests_out(monkeypatch) -> None:
    seen: list[int] = []
    real_pick = sim.pick

    def counting(policy, ctx, workers):
        seen.append(sum(len(w.in_flight) for w in workers))
        return real_pick(policy, ctx, workers)

    monkeypatch.setattr(sim, "pick", counting)
    workload = make_workload("prefix_repetition:4:256:64:8", 40, 1000.0, 1)
    result = simulate("kv_aware", workload, 2, SimParams(), seed=1, concurrency=3)
    assert len(seen) == 40 and max(seen) == 2  # the other two, at every send
    assert result["ttft_p99_s"] < 2.0  # no open-loop backlog at 1000 requests/s


async def test_the_router_logs_each_kv_aware_decision(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    core = RouterCore(RouterConfig(policy="kv_aware", metrics_port=None, seed=0,
                                   decision_log=path))
    for wid in ("a", "b"):
        core.registry.upsert(WorkerState(worker_id=wid, endpoint=f"127.0.0.1:{ord(wid)}",
                                         model="m", role="both", block_size=BS))
    servicer = RouterServicer(core, WorkerLifecycle(core))

    class NoDeadline:
        def time_remaining(self) -> None:
            return None

    prompt = list(range(5000, 5400))
    replies = [await servicer.Route(router_pb2.RouteRequest(
        request_id=rid, model="m", token_ids=prompt, max_tokens=4), NoDeadline())
        for rid in ("r1", "r2")]
    core.decision_log.close()
    logged = decision_log.read(path)
    assert set(logged) == {"r1", "r2"}
    second = logged["r2"]
    assert second["workers"][second["chosen"]] == replies[1].worker.worker_id
    first = second["workers"].index(replies[0].worker.worker_id)
    # r1's blocks count on its worker by pending marks only (no events yet) ...
    assert second["view"][first] == (400 // BS) * BS
    assert second["confirmed"][first] == 0
    # ... and r1's queued prefill is in that worker's cost terms.
    assert second["terms"][str(first)]["queued_prefill"] == pytest.approx(400 / 2500)
    assert set(second["terms"]) == {str(i) for i in second["kept"]}


def test_a_real_run_joins_the_decision_log_by_completion_id(tmp_path: Path) -> None:
    from kvmesh.bench.routing.real import explain_misses, front_cpu_per_request, front_cpu_s

    entry = {"block_size": BS, "chosen": 0, "view": [0, 0], "confirmed": [0, 0],
             "kept": [0, 1], "near": [0, 1], "terms": {}}
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps({**entry, "request_id": rid}) + "\n"
                           for rid in ("cmpl-1", "cmpl-2")))
    results = [{"id": "cmpl-1", "cached": 640.0}, {"id": "cmpl-2", "cached": 0.0},
               {"id": "cmpl-3", "cached": 0.0}]  # not routed by kv_aware: not joined
    found = explain_misses(log, results, [640, 640, 640])
    assert found == [None, ("not_held", 640)]
    assert explain_misses(tmp_path / "none.jsonl", results, [0, 0, 0]) == []
    import subprocess
    import sys
    import time
    spin = subprocess.Popen([sys.executable, "-c",
                             "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while front_cpu_s([spin])[0] < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 0.3 <= front_cpu_s([spin])[0] < 5
    finally:
        spin.kill()
        spin.wait()
    assert front_cpu_s([spin]) == [0.0]  # gone: counts nothing, raises nothing
    # Per request, in all and per process (a kvmesh front end: gateway, then router).
    assert front_cpu_per_request("kv_aware", [3.0, 1.0], 100) == {
        "front_cpu_ms_per_request": 40.0,
        "front_cpu_ms_per_request_by_process": {"gateway": 30.0, "router": 10.0}}
    assert front_cpu_per_request("smg:cache_aware", [2.0], 100)[
        "front_cpu_ms_per_request_by_process"] == {"smg": 20.0}
