"""Security between kvmesh's own services: mutual TLS on every internal gRPC hop and
the shared internal token the router's mutating RPCs demand.

Pure settings (no grpc): ``kvmesh.core.grpc_util`` turns them into channel and server
credentials, ``kvmesh.core.internal_auth`` checks the token.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, FilePath, SecretStr, SerializationInfo, field_serializer

#: The environment variable every service reads the internal token from when its
#: config names none (one variable for the whole mesh, e.g. from a Kubernetes Secret).
INTERNAL_TOKEN_ENV = "KVMESH_INTERNAL_TOKEN"

#: ``model_dump(context=REVEAL_SECRETS)`` writes secrets in clear: only for a child
#: process's own config (``dump_settings``), never for logs.
REVEAL_SECRETS = {"reveal_secrets": True}


class TlsConfig(BaseModel):
    """Mutual TLS: every internal server demands a client certificate signed by ``ca_file``
    and every internal client presents ``cert_file`` and checks the server's."""

    model_config = {"extra": "forbid"}

    ca_file: FilePath = Field(
        description="PEM bundle of the CA that signs every kvmesh service's certificate; "
        "peers (clients and servers) are verified against it.")
    cert_file: FilePath = Field(
        description="PEM certificate of this service, used as server and as client; its "
        "subject alternative names must cover the host others dial it by (IP or DNS).")
    key_file: FilePath = Field(description="PEM private key of cert_file.")
    server_name: str | None = Field(
        None, description="Name to expect in servers' certificates instead of the host "
        "dialled (when certificates name a DNS name but peers are dialled by IP).")


def _token_from_env() -> SecretStr | None:
    value = os.environ.get(INTERNAL_TOKEN_ENV)
    return SecretStr(value) if value else None


class SecurityConfig(BaseModel):
    """How a service authenticates its peers inside the mesh."""

    model_config = {"extra": "forbid"}

    tls: TlsConfig | None = Field(
        None, description="Mutual TLS on every internal gRPC hop (gateway→router, "
        "gateway→worker, worker→router, router→worker events and probes, edge→router); "
        "None: plaintext. The gateway's public doors (OpenAI HTTP, Inference gRPC) are "
        "not internal and stay as they are.")
    internal_token: SecretStr | None = Field(
        default_factory=_token_from_env,
        description="Shared secret the router demands (metadata 'kvmesh-internal-token') "
        "on RegisterWorker, Heartbeat and DeregisterWorker, and that workers and gateways "
        f"send; default: the {INTERNAL_TOKEN_ENV} environment variable. A router without "
        "one refuses every registration. `kvmesh up` makes one per mesh when none is set.")

    @field_serializer("internal_token")
    def _dump_token(self, token: SecretStr | None, info: SerializationInfo) -> str | None:
        if token is None:
            return None
        context = info.context or {}
        return token.get_secret_value() if context.get("reveal_secrets") else str(token)
