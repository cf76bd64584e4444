"""python -m kvmesh.gateway — run the gateway on its own."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from kvmesh.core.config import GatewayConfig, load_settings
from kvmesh.core.logs import setup_logging
from kvmesh.core.service_main import base_parser, observability_settings, run_until_signalled
from kvmesh.core.tracing import setup_tracing
from kvmesh.gateway.server import GatewayServer


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("kvmesh gateway: OpenAI HTTP + kvmesh.v1.Inference gRPC")
    parser.add_argument("--grpc-port", type=int, default=None, help="Inference gRPC port")
    parser.add_argument("--router", default=None, help="router host:port")
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--api-key", action="append", default=None,
                        help="accepted API key (repeat for several); none = no auth")
    parser.add_argument("--max-prompt-tokens", type=int, default=None)
    parser.add_argument("--max-concurrent-requests", type=int, default=None)
    parser.add_argument("--max-streams-per-key", type=int, default=None)
    parser.add_argument("--endpoint-picker", action="store_true", default=None,
                        help="also serve the edge's endpoint picker (Envoy ext_proc) on the "
                        "gRPC port")
    args = parser.parse_args(argv)
    config = load_settings(
        GatewayConfig, args.config, host=args.host, port=args.port, grpc_port=args.grpc_port,
        router=args.router, ready_file=args.ready_file, api_keys=args.api_key,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_streams_per_key=args.max_streams_per_key, endpoint_picker=args.endpoint_picker,
        **observability_settings(args),
    )
    setup_logging("gateway", args.log_level, config.logging.json_format)
    setup_tracing(config.tracing, "gateway")
    asyncio.run(run_until_signalled(lambda: GatewayServer(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
