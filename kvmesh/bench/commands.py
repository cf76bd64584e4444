"""`kvmesh bench routing` and `kvmesh bench router`: their flags and what they run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvmesh.bench.routing.workloads import WORKLOADS


def bench_routing(args: argparse.Namespace) -> int:
    import json

    from kvmesh.bench.routing.run import run_routing_bench
    from kvmesh.bench.routing.sim import PRESETS

    real = None
    if args.mode == "real":
        from kvmesh.models.source import resolve_model

        real = {
            "model_dir": resolve_model(args.model),
            "smg_binary": args.smg,
            "repeat": args.repeat,
            "engine_flags": {"enforce_eager": args.enforce_eager,
                             "block_size": args.block_size,
                             "num_kv_blocks": args.num_kv_blocks},
        }
    report = run_routing_bench(
        args.workload.split(","), args.policies.split(","), args.workers, args.requests,
        args.rate_per_worker, args.seed, args.out, mode=args.mode, real=real,
        replicas=args.replicas, concurrency=args.concurrency, misses=args.misses,
        params=PRESETS[args.engine].__class__(**{
            **PRESETS[args.engine].__dict__,
            **({"capacity_blocks": args.num_kv_blocks} if args.num_kv_blocks else {})}),
    )
    for name, data in report["workloads"].items():
        print(f"== {name}")
        for policy, metrics in data["results"].items():
            print(f"  {policy:14s} " + "  ".join(f"{k}={v}" for k, v in metrics.items()
                                                 if k not in ("misses", "per_worker_by_turn")))
            if metrics.get("misses"):
                print(f"  {policy:14s} avoidable misses: " + json.dumps(metrics["misses"]))
        print("  ratios: " + json.dumps(data["ratios"]))
    return 0


def bench_router(args: argparse.Namespace) -> int:
    import json

    if args.rpc:
        from kvmesh.bench.router_rpc import run_router_rpc_bench

        fleets = tuple(int(n) for n in args.workers.split(","))
        report = run_router_rpc_bench(args.blocks, fleets, args.concurrency, args.duration_s,
                                      args.rate, finish=args.finish,
                                      transports=tuple(args.transports.split(",")),
                                      rounds=args.rounds, seed=args.seed)
        name = "router-rpc.json"
    else:
        from kvmesh.bench.router import run_router_bench

        report = run_router_bench(args.blocks, args.ray_blocks, args.seed)
        name = "router.json"
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(text)
    return 0



def add_router_benches(bench_sub: Any) -> None:
    """The routing and router benchmarks under `kvmesh bench`."""
    routing = bench_sub.add_parser("routing", help="routing policies side by side")
    routing.add_argument("--mode", choices=["sim", "real"], default="sim",
                         help="sim: simulated workers with real caches and KV events; "
                         "real: vLLM workers started here, each policy in turn")
    routing.add_argument("--smg", default=None,
                         help="real mode: path of the `smg` binary, to add smg:POLICY runs")
    routing.add_argument("--model", default="embedded", help="real mode: model")
    routing.add_argument("--enforce-eager", action="store_true", help="real mode")
    routing.add_argument("--block-size", type=int, default=32, help="real mode")
    routing.add_argument("--repeat", type=int, default=1,
                         help="real mode: run each policy this many times, policies taking "
                         "turns (fairer on a shared machine)")
    routing.add_argument("--num-kv-blocks", type=int, default=None,
                         help="KV capacity per worker in blocks (sim: the simulated cache; "
                         "real: caps each vLLM worker's cache and enables the oracle)")
    routing.add_argument("--workload", default="shared_prefix,multi_turn,low_reuse,bursty",
                         help="comma-separated: " + ", ".join(WORKLOADS)
                         + ", or prefix_repetition:PREFIXES:PREFIX_LEN:SUFFIX_LEN:OUTPUT_LEN "
                         "(vLLM's dataset, sized as its flags)")
    routing.add_argument("--policies",
                         default="random,round_robin,power_of_two,approx_prefix,kv_aware",
                         help="comma-separated; real mode also takes smg:POLICY (the smg "
                         "router) and POLICY/N (a kvmesh router admitting N requests in "
                         "flight per worker, the rest waiting at the router)")
    routing.add_argument("--engine", choices=["cpu", "fleet"], default="cpu",
                         help="sim: the simulated engine: 'cpu' (SmolLM2 on 2 CPU cores) or "
                         "'fleet' (GPU-class, ~100k prefill tok/s: 256 workers serve "
                         "10,000 requests/s)")
    routing.add_argument("--replicas", type=int, default=1,
                         help="sim: also run kv_aware behind this many router replicas, "
                         "each fed every worker's events, and report their agreement")
    routing.add_argument("--workers", type=int, default=16)
    routing.add_argument("--requests", type=int, default=2000)
    routing.add_argument("--rate-per-worker", type=float, default=3.5,
                         help="arrivals per second per worker")
    routing.add_argument("--seed", type=int, default=1)
    routing.add_argument("--concurrency", type=int, default=0,
                         help="closed loop: this many requests out at once, the next sent "
                         "as one finishes (vllm bench serve --max-concurrency; arrival "
                         "times ignored); 0 = open loop at --rate-per-worker")
    routing.add_argument("--misses", action="store_true",
                         help="sim: put each of kv_aware's avoidable misses down to the "
                         "rule that caused it (real mode always does, from the router's "
                         "decision log)")
    routing.add_argument("--out", type=Path, default=None,
                         help="write report.json and per-workload results.json + PNG here")
    routing.set_defaults(func=bench_routing)

    micro = bench_sub.add_parser("router", help="router core: decisions, ingestion, memory")
    micro.add_argument("--blocks", type=int, default=1_000_000, help="blocks to index")
    micro.add_argument("--ray-blocks", type=int, default=20_000,
                       help="index size for the side-by-side with Ray's PrefixTree")
    micro.add_argument("--seed", type=int, default=0)
    micro.add_argument("--out", type=Path, default=None)
    micro.add_argument("--rpc", action="store_true",
                       help="Route calls through a router process (python -m kvmesh.router) "
                       "on one core instead of the in-process core")
    micro.add_argument("--workers", default="16,256",
                       help="--rpc: fleet sizes to measure, comma-separated")
    micro.add_argument("--concurrency", type=int, default=64,
                       help="--rpc: Route calls in flight (closed loop)")
    micro.add_argument("--duration-s", type=float, default=10.0,
                       help="--rpc: seconds of each measured run")
    micro.add_argument("--rate", type=float, default=0.0,
                       help="--rpc: Route calls/s of the latency run (default 80%% of the "
                       "closed-loop rate)")
    micro.add_argument("--no-finish", dest="finish", action="store_false",
                       help="--rpc: no RequestFinished after each Route")
    micro.add_argument("--transports", default="stream",
                       help="--rpc: how requests reach the router, comma-separated, "
                       "measured in turns: stream (batches on a RouteStream, the "
                       "gateway's way), batch (unary RouteBatch calls), route (a Route "
                       "call per request)")
    micro.add_argument("--rounds", type=int, default=1,
                       help="--rpc: turns of every transport per fleet")
    micro.set_defaults(func=bench_router)

