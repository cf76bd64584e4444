"""`python -m kvmesh.core.health_probe HOST:PORT [SERVICE]`: exit 0 when a kvmesh service
answers SERVING on the standard gRPC health service, 1 otherwise.

Container images use it as their HEALTHCHECK (Kubernetes probes gRPC health natively);
it needs nothing beyond the core install, so every image has it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(target: str, tls: tuple[Path, Path, Path] | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    ca, cert, key = (path.read_bytes() for path in tls)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert))


def probe(target: str, service: str = "", timeout_s: float = 3.0,
          tls: tuple[Path, Path, Path] | None = None) -> str:
    """The health status name ``target`` reports, or why it could not be asked;
    ``tls`` (CA, certificate, key files) for a service with mutual TLS on."""
    with _channel(target, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmesh.core.health_probe",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("target", help="host:port of the service's gRPC server")
    parser.add_argument("service", nargs="?", default="", help="service name ('' = server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    parser.add_argument("--tls", nargs=3, type=Path, metavar=("CA", "CERT", "KEY"),
                        default=None, help="mutual TLS: the mesh's CA, a certificate it "
                        "signed and its key (a service with security.tls set)")
    args = parser.parse_args(argv)
    status = probe(args.target, args.service, args.timeout, args.tls)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
