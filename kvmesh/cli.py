"""The `kvmesh` command: up, deploy, status, down, models, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any, get_args

import grpc
from pydantic import ValidationError

from kvmesh.bench.commands import add_router_benches
from kvmesh.core.config import PolicyName, load_settings
from kvmesh.core.errors import KvmeshError
from kvmesh.core.logs import setup_logging
from kvmesh.core.lora_config import parse_lora_module
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.service_main import add_observability_flags, observability_settings
from kvmesh.core.validation import describe
from kvmesh.launch.placement import PlacementError
from kvmesh.launch.pool_runner import WorkerStartError
from kvmesh.launch.state import NoMeshError


def _up(args: argparse.Namespace) -> int:
    from kvmesh.launch.up import serve

    engine = _set(model=args.model, enforce_eager=args.enforce_eager or None,
                  block_size=args.block_size, lora=_lora(args))
    workers = args.workers
    if workers is None and (args.prefill or args.decode):
        workers = 0  # `--prefill N --decode M` alone: a pure P/D deployment
    overrides = _set(
        workers=workers,
        prefill=args.prefill,
        decode=args.decode,
        router=_set(policy=args.policy, disaggregation=args.disaggregation,
                    max_inflight_per_worker=args.max_inflight_per_worker,
                    autoscale={"enabled": True, "max_workers": args.autoscale}
                    if getattr(args, "autoscale", None) else None),
        gateway=_set(port=args.port, grpc_port=args.grpc_port, api_keys=args.api_key),
        worker=_set(engine=engine, engine_kind=args.engine_kind),
        **observability_settings(args),
        embeddings={"workers": 0} if args.no_embeddings else None,
        ray_address=getattr(args, "address", None),
        placement=args.placement,
        gateways=args.gateways,
        routers=args.routers,
        edge=({"enabled": True, **({"picker": True} if args.picker else {})}
              if args.edge or args.picker else None),
    )
    # Flags merge into the file's sections key by key (pydantic-settings deep-merges).
    config = load_settings(MeshConfig, args.config, **(overrides or {}))
    asyncio.run(serve(config, args.state_file, args.verbose))
    return 0


def _lora(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--enable-lora`, `--lora-modules`, `--max-loras`, `--max-lora-rank`,
    `--max-cpu-loras` as ``engine.lora`` (as `vllm serve` takes them)."""
    modules = dict(args.lora_modules or ())
    return _set(enable_lora=args.enable_lora or None, adapters=modules or None,
                max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                max_cpu_loras=args.max_cpu_loras)


def _lora_module(text: str) -> tuple[str, str]:
    try:
        return parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _set(**values: Any) -> dict[str, Any] | None:
    """The given values that are set; None when none is (so nothing is overridden)."""
    kept = {k: v for k, v in values.items() if v is not None}
    return kept or None


def _bench_gateway(args: argparse.Namespace) -> int:
    import json

    from kvmesh.bench.gateway import run_gateway_bench

    config = bench_mesh_config(args, workers=1)
    if args.against == "vllm-serve":
        from kvmesh.bench.vs_serve import ClientLoad, run_vs_serve

        load = ClientLoad(num_prompts=args.requests, concurrency=args.concurrency,
                          input_len=args.input_len, output_len=args.max_tokens, seed=args.seed)
        result = run_vs_serve(config, load, args.rounds, args.out, args.profile)
    else:
        result = run_gateway_bench(config, args.requests, args.concurrency, args.max_tokens,
                                   args.out)
    print(json.dumps(result, indent=2))
    return 0


def bench_mesh_config(args: argparse.Namespace, **overrides: Any) -> MeshConfig:
    """The mesh a benchmark starts: only what it measures (no embedding worker, which
    would share the cores the measured engines are pinned to)."""
    engine = _set(enforce_eager=args.enforce_eager or None, block_size=args.block_size)
    return load_settings(MeshConfig, args.config, gateway=_set(port=0),
                         worker=_set(engine=engine), embeddings={"workers": 0}, **overrides)


def _bench_pd(args: argparse.Namespace) -> int:
    import json

    from kvmesh.bench.pd import Workload, run_pd_bench

    config = bench_mesh_config(args)
    workload = Workload(shorts=args.shorts, short_max_tokens=args.short_max_tokens,
                        longs=args.longs, long_tokens=args.long_tokens)
    result = run_pd_bench(config, workload, args.disaggregation, args.seed, args.out)
    print(json.dumps(result, indent=2))
    return 0


def _model_prepare(args: argparse.Namespace) -> int:
    from kvmesh.models.source import resolve_model

    print(resolve_model(args.model))
    return 0


def _models(args: argparse.Namespace) -> int:
    from kvmesh.launch import models_cmd

    if args.model_command == "add":
        return asyncio.run(models_cmd.add(args.config, args.state_file, args.admin, args.json))
    if args.model_command == "remove":
        return asyncio.run(models_cmd.remove(args.model_id, args.state_file, args.admin,
                                             args.json))
    return asyncio.run(models_cmd.show(args.state_file, args.admin, args.json))


def _status(args: argparse.Namespace) -> int:
    from kvmesh.launch.state import read_state
    from kvmesh.launch.status import print_status

    if args.router:
        return asyncio.run(print_status(args.router, as_json=args.json))
    mesh = read_state(args.state_file)
    return asyncio.run(print_status(mesh["router"], as_json=args.json, mesh=mesh))


def _down(args: argparse.Namespace) -> int:
    import json

    from kvmesh.launch.state import stop_mesh

    result = stop_mesh(args.state_file, args.timeout)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"kvmesh stopped (pids {', '.join(map(str, result['stopped']))})"
              + (f"; forced: {result['forced']}" if result["forced"] else "")
              + (f"; still alive: {result['alive']}" if result["alive"] else ""))
    return 1 if result["alive"] else 0


def _add_mesh_arguments(p: argparse.ArgumentParser) -> None:
    """What `kvmesh up` and `kvmesh deploy ray` share: the mesh's shape and settings."""
    p.add_argument("--workers", type=int, default=None, help="number of workers (default 1)")
    p.add_argument("--prefill", type=int, default=None,
                   help="prefill workers (P pool; with --decode; no both-workers unless "
                   "--workers is given)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (D pool)")
    p.add_argument("--disaggregation", default=None, choices=["auto", "always", "never"],
                   help="when the router splits prefill and decode (default auto)")
    p.add_argument("--port", type=int, default=None, help="OpenAI HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=None, help="Inference gRPC port")
    p.add_argument("--policy", default=None,
                   choices=get_args(PolicyName),
                   help="routing policy (default kv_aware)")
    p.add_argument("--max-inflight-per-worker", type=int, default=None,
                   help="router admission: requests in flight per worker before new ones "
                   "wait at the router for a slot (default 0: no limit)")
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON MeshConfig file")
    p.add_argument("--model", default=None,
                   help="model folder, 'embedded', hf://org/name[@rev], s3://bucket/prefix "
                   "or gs://bucket/prefix (docs/models.md)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile")
    p.add_argument("--block-size", type=int, default=None, help="KV block size (CPU: 32k)")
    p.add_argument("--engine-kind", default=None, choices=["vllm", "fake"],
                   help="'fake' for plumbing tests only")
    p.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters of the model (loaded on demand; "
                   "/v1/load_lora_adapter adds more at run time)")
    p.add_argument("--lora-modules", nargs="+", type=_lora_module, default=None,
                   metavar="NAME=PATH_OR_URI",
                   help="adapters as NAME=SOURCE (a folder, hf://, s3://, gs://) or "
                   '\'{"name": ..., "path": ...}\'; requests use NAME as `model`')
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapters one engine batch may mix (default 1)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="largest adapter rank (default 16)")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters a worker keeps loaded (default: --max-loras)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="serve no embedding model (default: all-MiniLM-L6-v2 next to the "
                   "chat model)")
    p.add_argument("--state-file", type=Path, default=None,
                   help="write addresses and PIDs here as JSON once up (default: "
                   "$KVMESH_STATE_FILE, $XDG_RUNTIME_DIR/kvmesh/up.json or "
                   "~/.cache/kvmesh/up.json; `kvmesh status`/`down` read it)")
    p.add_argument("--verbose", action="store_true", help="show worker logs")
    add_observability_flags(p)
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeat for several); none = no auth")
    p.add_argument("--gateways", type=int, default=None, help="gateway replicas (default 1)")
    p.add_argument("--routers", type=int, default=None,
                   help="router replicas, each fed every worker (default 1)")
    p.add_argument("--edge", action="store_true",
                   help="Envoy in front of the gateways, configured live over xDS; the API "
                   "address printed is Envoy's")
    p.add_argument("--autoscale", type=int, default=None, metavar="MAX",
                   help="let the router size each worker pool from its load, up to MAX "
                   "workers (router.autoscale in a config file sets the rest; "
                   "docs/autoscaling.md)")
    p.add_argument("--picker", action="store_true",
                   help="with the edge: Envoy asks the endpoint picker (ext_proc, the "
                   "router's kv_aware choice) which gateway each generation goes to")
    p.add_argument("--placement", default=None,
                   choices=["none", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="reserve all workers as one Ray placement group first (default none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description=__doc__)
    parser.add_argument("--log-level", default=None)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run router + workers + gateway on this machine")
    _add_mesh_arguments(up)
    up.set_defaults(func=_up)

    deploy = sub.add_parser("deploy", help="run kvmesh on a cluster you already operate")
    on_ray = deploy.add_subparsers(dest="target", required=True).add_parser("ray", help=(
        "workers as actors on an existing Ray cluster (placed by their resources and "
        "--placement); router and gateway on this host"))
    on_ray.add_argument("--address", required=True,
                        help="the Ray cluster to join (host:port of its head)")
    _add_mesh_arguments(on_ray)
    on_ray.set_defaults(func=_up)

    bench = sub.add_parser("bench", help="benchmarks (print ratios measured in one run)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    gw = bench_sub.add_parser("gateway", help="tokens/s through the mesh vs vLLM direct")
    gw.add_argument("--requests", type=int, default=16)
    gw.add_argument("--concurrency", type=int, default=8)
    gw.add_argument("--max-tokens", type=int, default=64)
    gw.add_argument("--config", type=Path, default=None)
    gw.add_argument("--enforce-eager", action="store_true")
    gw.add_argument("--block-size", type=int, default=None)
    gw.add_argument("--out", type=Path, default=None, help="write results.json here")
    gw.add_argument("--against", choices=("worker", "vllm-serve"), default="worker",
                    help="worker: the mesh's own worker called directly (kvmesh's client); "
                    "vllm-serve: vLLM's OpenAI server on the same engine settings, both "
                    "sides driven by `vllm bench serve` (chat, streaming), one at a time")
    gw.add_argument("--rounds", type=int, default=2,
                    help="--against vllm-serve: rounds of both sides, alternating the order")
    gw.add_argument("--input-len", type=int, default=128,
                    help="--against vllm-serve: random prompt length in tokens")
    gw.add_argument("--seed", type=int, default=0, help="--against vllm-serve: dataset seed")
    gw.add_argument("--profile", default=None,
                    help="--against vllm-serve: py-spy these processes while measuring "
                    "(comma-separated: gateway, router, workers, server)")
    gw.set_defaults(func=_bench_gateway)

    pdb = bench_sub.add_parser(
        "pd", help="aggregated (2 x both) vs 1 prefill + 1 decode worker, mixed workload")
    pdb.add_argument("--shorts", type=int, default=4, help="short prompts that decode long")
    pdb.add_argument("--short-max-tokens", type=int, default=96)
    pdb.add_argument("--longs", type=int, default=4, help="long prompts arriving meanwhile")
    pdb.add_argument("--long-tokens", type=int, default=1500)
    pdb.add_argument("--disaggregation", default="auto", choices=["auto", "always"],
                     help="the router's P/D decision in the 1P+1D run")
    pdb.add_argument("--config", type=Path, default=None)
    pdb.add_argument("--enforce-eager", action="store_true")
    pdb.add_argument("--block-size", type=int, default=32)
    pdb.add_argument("--seed", type=int, default=0)
    pdb.add_argument("--out", type=Path, default=None, help="write results.json here")
    pdb.set_defaults(func=_bench_pd)
    add_router_benches(bench_sub)

    model = sub.add_parser("models", aliases=["model"], help="model files; a running "
                           "mesh's models (add/remove a model's worker pool, list them)")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser(
        "prepare", help="prepare or fetch a model into this node's cache; print its folder "
        "(default: embedded)")
    prepare.add_argument("model", nargs="?", default="embedded")
    prepare.set_defaults(func=_model_prepare)
    add = model_sub.add_parser("add", help="start a model's worker pool in the running mesh")
    add.add_argument("--config", type=Path, required=True,
                     help="YAML/JSON of one model (model_id, source, engine, workers, "
                     "resources, policy: docs/models.md)")
    remove = model_sub.add_parser("remove", help="stop a model's worker pool")
    remove.add_argument("model_id")
    listing = model_sub.add_parser("list", help="the running mesh's models and workers")
    for p in (add, remove, listing):
        p.add_argument("--state-file", type=Path, default=None,
                       help="kvmesh up's state (default: as for status)")
        p.add_argument("--admin", default=None,
                       help="host:port of the mesh's admin service (default: from the state)")
        p.add_argument("--json", action="store_true", help="one JSON document, for scripts")
        p.set_defaults(func=_models)

    status = sub.add_parser("status", help="workers, models and load, from the router")
    status.add_argument("--router", default=None,
                        help="router host:port (default: the running kvmesh up's)")
    status.add_argument("--state-file", type=Path, default=None,
                        help="kvmesh up's state (default: $KVMESH_STATE_FILE, "
                        "$XDG_RUNTIME_DIR/kvmesh/up.json or ~/.cache/kvmesh/up.json)")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.set_defaults(func=_status)

    down = sub.add_parser("down", help="stop the running kvmesh up (by its recorded PIDs)")
    down.add_argument("--state-file", type=Path, default=None,
                      help="kvmesh up's state (default: as for status)")
    down.add_argument("--timeout", type=float, default=90.0,
                      help="seconds for an ordered stop before the processes are killed "
                      "(gateways, then workers, each drain up to drain_timeout_s, 30 s)")
    down.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    down.set_defaults(func=_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("kvmesh", args.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result: int = args.func(args)
    except ValidationError as exc:  # a bad config: every faulty key, one line each
        print(f"kvmesh: {describe(exc)}", file=sys.stderr)
        return 2
    except (NoMeshError, PlacementError, WorkerStartError) as exc:  # the mesh, not the input
        print(f"kvmesh: {exc}", file=sys.stderr)
        return 1
    except KvmeshError as exc:  # says what is wrong (a missing model, a bad key, ...)
        print(f"kvmesh: {exc.message}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:  # the mesh's admin service refused or is gone
        print(f"kvmesh: {exc.details()} ({exc.code().name})", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
