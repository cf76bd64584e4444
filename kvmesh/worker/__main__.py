"""python -m kvmesh.worker — run one worker on its own (a Ray actor by default)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from kvmesh.core.config import WorkerConfig, load_settings
from kvmesh.core.errors import ModelNotFoundError
from kvmesh.core.logs import setup_logging
from kvmesh.core.service_main import (
    base_parser,
    observability_settings,
    run_until_signalled,
    write_ready_file,
)

log = logging.getLogger("kvmesh.worker")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("kvmesh worker: vLLM behind the VllmEngine gRPC contract")
    parser.add_argument("--model", default=None,
                        help="model folder, 'embedded', hf://org/name[@rev], "
                        "s3://bucket/prefix or gs://bucket/prefix (docs/models.md)")
    parser.add_argument("--router", default=None, help="router host:port to register with")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--role", default=None, choices=["both", "prefill", "decode"])
    parser.add_argument("--engine-kind", default=None, choices=["vllm", "fake"])
    parser.add_argument("--enforce-eager", action="store_true", default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--load-format", default=None,
                        help="vLLM load format ('dummy': random weights, plumbing tests)")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="cap the KV cache at this many blocks")
    parser.add_argument("--cpu-bind", default=None, help="cores for the engine, e.g. 0-1")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics port (0 = free port)")
    parser.add_argument("--no-ray", action="store_true", help="run in this process, no Ray")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join")
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)

    engine: dict[str, Any] = {
        k: v
        for k, v in {
            "model": args.model,
            "enforce_eager": args.enforce_eager,
            "block_size": args.block_size,
            "max_model_len": args.max_model_len,
            "load_format": args.load_format,
            "num_kv_blocks": args.num_kv_blocks,
        }.items()
        if v is not None
    }
    # Engine flags deep-merge into the file's engine section.
    config = load_settings(
        WorkerConfig, args.config, host=args.host, port=args.port, router=args.router,
        worker_id=args.worker_id, role=args.role, engine_kind=args.engine_kind,
        cpu_bind=args.cpu_bind, run_dir=args.run_dir, engine=engine or None,
        metrics_port=args.metrics_port, **observability_settings(args),
    )
    setup_logging("worker", args.log_level, config.logging.json_format)
    try:
        return _run(args, config)
    except ModelNotFoundError as exc:  # says what is missing; a traceback would not
        log.error("%s", exc.message)
        return 2


def _run(args: argparse.Namespace, config: WorkerConfig) -> int:
    if args.no_ray:
        from kvmesh.core.tracing import setup_tracing
        from kvmesh.worker.worker import WorkerServer

        setup_tracing(config.tracing, "worker")
        asyncio.run(run_until_signalled(lambda: WorkerServer(config, args.ready_file)))
        return 0

    import ray

    from kvmesh.models.source import resolve_model
    from kvmesh.worker.actor import init_ray, spawn_worker_actor

    if not args.ray_address:  # fetch on this node first: the actor runs offline
        resolve_model(config.engine.model)
    init_ray(args.ray_address)

    class ActorService:
        def __init__(self) -> None:
            self.actor = spawn_worker_actor(config)

        async def start(self) -> None:
            info = await self.actor.start.remote()
            log.info("worker actor up: %s", info)
            write_ready_file(args.ready_file, info)

        async def stop(self) -> None:
            try:
                await self.actor.stop.remote()
            finally:
                ray.kill(self.actor)
                ray.shutdown()

    asyncio.run(run_until_signalled(ActorService))
    return 0


if __name__ == "__main__":
    sys.exit(main())
