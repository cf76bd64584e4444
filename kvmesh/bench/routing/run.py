"""`kvmesh bench routing`: compare routing policies side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvmesh.bench.routing.sim import SimParams, run_all
from kvmesh.bench.routing.workloads import make_workload


def ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The comparisons the targets are stated in, when those policies ran."""
    out: dict[str, float] = {}
    kv = results.get("kv_aware")
    if kv is None:
        return out
    for other in ("power_of_two", "approx_prefix"):
        if other in results and results[other]["ttft_p90_s"] > 0:
            out[f"kv_aware_ttft_p90_over_{other}"] = round(
                kv["ttft_p90_s"] / results[other]["ttft_p90_s"], 3)
            out[f"kv_aware_throughput_over_{other}"] = round(
                kv["throughput_tok_s"] / results[other]["throughput_tok_s"], 3)
    for other in ("smg:cache_aware", "smg:power_of_two"):
        ref = results.get(other)
        if ref and ref.get("throughput_tok_s"):
            out[f"kv_aware_throughput_over_{other}"] = round(
                kv["throughput_tok_s"] / ref["throughput_tok_s"], 3)
            out[f"kv_aware_ttft_p50_over_{other}"] = round(
                kv["ttft_p50_s"] / ref["ttft_p50_s"], 3)
    if kv.get("oracle_hit_rate"):
        out["kv_aware_hit_rate_over_oracle"] = round(
            kv["hit_rate"] / kv["oracle_hit_rate"], 3)
    return out


def plot(results: dict[str, dict[str, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for q, style in (("ttft_p50_s", "o"), ("ttft_p90_s", "s"), ("ttft_p99_s", "^")):
        axes[0].plot(names, [results[n][q] for n in names], style + "-", label=q[5:8])
    axes[0].set_ylabel("TTFT (s)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].bar(names, [results[n]["hit_rate"] or 0 for n in names], label="hit rate")
    oracle = [results[n]["oracle_hit_rate"] for n in names]
    if all(o is not None for o in oracle):
        axes[1].plot(names, oracle, "k_", markersize=30, label="oracle")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[2].bar(names, [results[n]["throughput_tok_s"] for n in names])
    axes[2].set_ylabel("output tokens/s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_routing_bench(
    workloads: list[str], policies: list[str], workers: int, requests: int,
    rate_per_worker: float, seed: int, out: Path | None,
    params: SimParams | None = None, mode: str = "sim", real: dict[str, Any] | None = None,
    replicas: int = 1, concurrency: int = 0, misses: bool = False,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "mode": mode, "workers": workers, "requests": requests,
        "rate_per_worker": rate_per_worker, "concurrency": concurrency, "seed": seed,
        "workloads": {},
    }
    for name in workloads:
        workload = make_workload(name, requests, rate_per_worker * workers, seed)
        if mode == "real":
            from kvmesh.bench.routing.real import run_real

            results = run_real(workload, policies, workers, concurrency=concurrency,
                               **(real or {}))
        else:
            results = run_all(policies, workload, workers, seed, params, replicas,
                              concurrency, misses)
        report["workloads"][name] = {"results": results, "ratios": ratios(results)}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).mkdir(exist_ok=True)
            (out / name / "results.json").write_text(json.dumps(results, indent=2))
            what = "simulated workers" if mode == "sim" else "vLLM CPU workers"
            plot(results, f"{name}: {workers} {what}, {requests} requests",
                 out / name / "policies.png")
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
