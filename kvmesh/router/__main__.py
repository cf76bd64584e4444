"""python -m kvmesh.router — run the router on its own."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import get_args

from kvmesh.core.config import PolicyName, RouterConfig, load_settings
from kvmesh.core.logs import setup_logging
from kvmesh.core.service_main import base_parser, observability_settings, run_until_signalled
from kvmesh.core.tracing import setup_tracing
from kvmesh.router.server import RouterServer


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("kvmesh router: worker registry and routing")
    parser.add_argument("--policy", default=None,
                    choices=get_args(PolicyName),
                    help="routing policy (default kv_aware)")
    parser.add_argument(
        "--worker", action="append", default=None, dest="static_workers",
        help="register a VllmEngine worker by address (repeatable)",
    )
    parser.add_argument("--disaggregation", default=None, choices=["auto", "always", "never"],
                        help="prefill/decode split when P and D workers exist (default auto)")
    parser.add_argument("--max-inflight-per-worker", type=int, default=None,
                        help="admission: requests in flight per worker before new ones wait "
                        "at the router (default 0: no limit)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics port (0 = free port)")
    parser.add_argument("--decision-log", type=Path, default=None,
                        help="append every kv_aware decision's workings here (JSON lines)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write the address here")
    args = parser.parse_args(argv)
    config = load_settings(
        RouterConfig, args.config, host=args.host, port=args.port, policy=args.policy,
        static_workers=args.static_workers, metrics_port=args.metrics_port,
        disaggregation=args.disaggregation, max_inflight_per_worker=args.max_inflight_per_worker,
        decision_log=args.decision_log,
        **observability_settings(args),
    )
    setup_logging("router", args.log_level, config.logging.json_format)
    setup_tracing(config.tracing, "router")
    asyncio.run(run_until_signalled(lambda: RouterServer(config, ready_file=args.ready_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
