"""Typed configuration: one pydantic settings model per process (router, worker,
gateway; ``MeshConfig`` for ``kvmesh up`` is in ``mesh_config``, one model's pool in
``model_config``), every field with a description.

Precedence, highest first: command-line flags, environment (``KVMESH_<SERVICE>_...``,
nested with ``__``), the YAML/JSON config file, defaults (``kvmesh.core.settings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from kvmesh.core.autoscale_config import AutoscaleConfig
from kvmesh.core.cost_config import CostParams
from kvmesh.core.edge_config import EdgeConfig, EdgeServiceConfig, GatewayAddress
from kvmesh.core.engine_config import EngineConfig, KvTransferConfig, role_engine
from kvmesh.core.resilience_config import FailoverConfig, OutlierConfig
from kvmesh.core.roles import WorkerRole
from kvmesh.core.security_config import SecurityConfig, TlsConfig
from kvmesh.core.settings import (
    DEFAULT_HOST,
    ServiceSettings,
    dump_settings,
    load_settings,
    read_config_file,
)
from kvmesh.core.telemetry_config import LoggingConfig, TracingConfig

__all__ = [  # the engine's and the loader's names, importable from here as before
    "EngineConfig", "KvTransferConfig", "role_engine", "dump_settings", "load_settings",
    "read_config_file", "TracingConfig", "LoggingConfig", "EdgeConfig", "EdgeServiceConfig",
    "GatewayAddress", "CostParams", "AutoscaleConfig", "FailoverConfig", "OutlierConfig",
    "SecurityConfig", "TlsConfig",
]

PolicyName = Literal["kv_aware", "approx_prefix", "round_robin", "power_of_two", "random"]


class RouterConfig(ServiceSettings):
    """The router service."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_ROUTER_", env_nested_delimiter="__")

    host: str = Field(DEFAULT_HOST, description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    policy: PolicyName = Field(
        "kv_aware",
        description="Routing policy: kv_aware (prefix index + cost model), approx_prefix "
        "(Ray Serve-style baseline), power_of_two, round_robin, random.",
    )
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="How often self-registered workers must heartbeat."
    )
    lease_ttl_s: float = Field(
        10.0, gt=0, description="A worker not seen alive for this long is removed."
    )
    probe_interval_s: float = Field(
        1.0, gt=0, description="How often the router polls each worker's GetLoads."
    )
    probe_timeout_s: float = Field(
        5.0, gt=0, description="Deadline of each call the router makes to a worker "
        "(GetModelInfo, GetServerInfo, GetLoads).")
    kv_event_idle_timeout_s: float = Field(
        15.0, gt=0, description="A worker's SubscribeKvEvents stream that brings nothing "
        "(not even the servicer's heartbeat, every 1-5 s) for this long is dropped and "
        "resumed: a stalled stream cannot keep stale cache claims longer.")
    static_workers: list[str] = Field(
        default_factory=list,
        description="host:port of VllmEngine workers to register by address at start "
        "(e.g. plain vLLM gRPC servers).",
    )
    disaggregation: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Prefill/decode split when prefill and decode workers are registered: "
        "'auto' decides per request with the cost model, 'always' splits every request "
        "it can, 'never' runs every request on one worker.",
    )
    max_inflight_per_worker: int = Field(
        0, ge=0,
        description="Admission: requests this router has in flight on one worker (routed, "
        "not finished) before new ones wait here for a free slot; 0 = no limit. Under overload "
        "the engines then hold only what they work on, so queued prompts do not evict "
        "cached prefixes, and waiting requests are placed late, on fresh cache state.")
    admission_max_wait_s: float = Field(
        120.0, gt=0,
        description="Longest a request waits for a worker slot before it is refused with "
        "429 + Retry-After (also bounded by the caller's deadline).")
    seed: int | None = Field(None, description="Seed for random tie-breaks (tests).")
    autoscale: AutoscaleConfig = Field(
        default_factory=AutoscaleConfig,
        description="Desired worker counts per pool from the load (docs/autoscaling.md).")
    cost: CostParams = Field(
        default_factory=CostParams,
        description="The cost model's rates and weights (kv_aware and the P/D decision).")
    snapshot_path: Path | None = Field(
        None, description="Where the prefix index is snapshotted and restored from on "
        "restart (None: no snapshots).")
    snapshot_interval_s: float = Field(30.0, gt=0, description="Seconds between snapshots.")
    decision_log: Path | None = Field(
        None, description="Append every kv_aware decision's workings (each candidate's "
        "cached prefix, load bound, cost terms) to this JSON-lines file, to explain "
        "routing after the fact (docs/routing.md). Off by default.")
    snapshot_max_age_s: float = Field(
        600.0, gt=0, description="An older snapshot is ignored at start (too stale).")
    metrics_port: int | None = Field(
        9400, ge=0, le=65535,
        description="Prometheus /metrics port (0 picks a free one; None turns it off).")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: gRPC health turns NOT_SERVING at once, then "
        "Route calls in flight (those waiting for a worker slot too) may finish for up to "
        "this many seconds before the router stops (0: stop at once).")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="Tracing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,
        description="Mutual TLS on internal gRPC hops and the internal token.")

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> RouterConfig:
        if self.lease_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("lease_ttl_s must be longer than heartbeat_interval_s")
        return self


class WorkerConfig(ServiceSettings):
    """A worker: one engine serving VllmEngine, registered with the router."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_WORKER_", env_nested_delimiter="__")

    host: str = Field(DEFAULT_HOST, description="Address the gRPC server binds.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    advertise_host: str | None = Field(
        None, description="Host the router and gateway use to reach this worker; default host."
    )
    worker_id: str | None = Field(None, description="Stable id; default: the endpoint.")
    router: str | None = Field(
        None, description="host:port of the router to register with (comma-separated for "
        "several router replicas); None runs unregistered."
    )
    role: WorkerRole = Field(WorkerRole.both, description="both, prefill or decode.")
    registration_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of each call to the router's registry "
        "(RegisterWorker, Heartbeat, DrainWorker, DeregisterWorker).")
    engine_kind: Literal["vllm", "fake"] = Field(
        "vllm", description="'vllm' (real engine) or 'fake' (tests and simulation only)."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine settings.")
    kv_transfer: KvTransferConfig = Field(
        default_factory=KvTransferConfig,
        description="KV hand-over between prefill and decode workers (roles prefill/decode).",
    )
    run_dir: Path = Field(
        Path("/tmp/kvmesh"), description="Where sockets (KV-event IPC) and logs live."
    )
    cpu_bind: str | None = Field(
        None, description="Cores for the engine's OpenMP threads, e.g. '0-1' or '1'; "
        "None binds all cores."
    )
    engine_nice: int = Field(
        0, ge=0, le=19, description="Niceness added to the engine's own processes (vLLM's "
        "engine core, every thread; not the worker's gRPC front), so that where engines "
        "share cores with the gateway, the router and the worker's front, those short "
        "hops get a core first. 0 (default) leaves the engine as started: on the 2-core "
        "CPU hosts measured, +10 gained nothing and once cost throughput "
        "(docs/benchmarks.md, 'Engine niceness').")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs the worker actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs the worker actor reserves.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources the worker actor reserves, e.g. {'gpu_pool': 1}: "
        "it runs only on nodes that offer them (`ray start --resources`).")
    routing_policy: PolicyName | None = Field(
        None, description="Routing policy the router uses for this worker's model, sent "
        "with its registration (a model's `policy`); None: the router's own policy.")
    fake_token_delay_s: float = Field(
        0.005, ge=0, description="Fake engine only: seconds per generated token."
    )
    fake_start_delay_s: float = Field(
        0.0, ge=0, description="Fake engine only: seconds its start takes (a model load, "
        "simulated: a slow or stuck start against startup_timeout_s).")
    fake_output: Literal["echo", "chain"] = Field(
        "echo", description="Fake engine only: echo the prompt, or 'chain' (each token a "
        "fixed function of the previous one: resumable like a greedy model).")
    metrics_port: int | None = Field(
        0, ge=0, le=65535,
        description="Prometheus /metrics port serving vLLM's own `vllm:*` metrics (0 picks "
        "a free one; None turns it off). Registered with the router for discovery.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: gRPC health turns NOT_SERVING and the router "
        "routes nothing new here (DrainWorker) at once, then generations in flight may "
        "finish for up to this many seconds before the worker deregisters and stops.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="Tracing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,
        description="Mutual TLS on internal gRPC hops and the internal token.")


class ModelParsers(BaseModel):
    """Output parsers for one model (names from vLLM's parser registries)."""

    model_config = {"extra": "forbid"}

    tool_call_parser: str | None = Field(
        None, description="vLLM tool-call parser for tool_choice=auto (e.g. hermes)."
    )
    reasoning_parser: str | None = Field(
        None, description="vLLM reasoning parser splitting reasoning from content "
        "(e.g. deepseek_r1); None serves the output as content."
    )


class GatewayConfig(ServiceSettings):
    """The gateway: OpenAI HTTP API + kvmesh.v1.Inference gRPC API."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_GATEWAY_", env_nested_delimiter="__")

    host: str = Field(DEFAULT_HOST, description="Address the HTTP and gRPC servers bind.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    grpc_port: int = Field(50052, ge=0, le=65535, description="Inference gRPC port; 0 = free.")
    router: str = Field(
        "127.0.0.1:50051", description="host:port of the router (comma-separated for "
        "several replicas; `routers` takes them as a list).")
    routers: list[str] = Field(
        default_factory=list,
        description="host:port of every router replica, in order of preference; the "
        "gateway fails over between them, and with none reachable routes on its own over "
        "the last worker set (empty: `router`).")
    failover: FailoverConfig = Field(
        default_factory=FailoverConfig,
        description="Worker loss mid-request (retry, mid-stream resume) and router loss.")
    outlier: OutlierConfig = Field(
        default_factory=OutlierConfig,
        description="Per-worker circuit breaking (consecutive failures eject a worker).")
    register_with_router: bool = Field(
        True, description="Register with the router as a gateway replica (heartbeats, "
        "deregistered on stop), so the edge's control plane finds it in WatchWorkers.")
    registration_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of each call to the router's registry "
        "(RegisterWorker, Heartbeat, DrainWorker, DeregisterWorker).")
    drain_s: float = Field(
        0.5, ge=0, le=30, description="On stop, seconds between deregistering and closing "
        "the listeners: a proxy in front (the edge) stops sending new requests here first.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: gRPC health turns NOT_SERVING and /health "
        "answers 503 at once, the gateway leaves the router's gateway set, then requests "
        "in flight may finish for up to this many seconds before the listeners close.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline for one generation, end to end."
    )
    route_timeout_s: float = Field(5.0, gt=0, description="Deadline for one Route call.")
    route_queue_timeout_s: float = Field(
        120.0, ge=0,
        description="Extra time a Route call may take while the router holds it for a free "
        "worker slot (router admission, `max_inflight_per_worker`).")
    prefill_timeout_s: float = Field(
        60.0, gt=0,
        description="Deadline for the prefill leg of a disaggregated request; past it (or "
        "on any prefill failure) the decode worker prefills locally instead.",
    )
    default_max_tokens: int = Field(
        512, gt=0, description="max_tokens when the client sends none (capped by context)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Largest accepted HTTP request body."
    )
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="Longest accepted prompt in tokens (None: the context length)."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (Authorization: Bearer KEY); empty disables auth. "
        "Env KVMESH_GATEWAY_API_KEYS takes a JSON list.",
    )
    max_concurrent_requests: int | None = Field(
        None, gt=0, description="Generations in flight on this gateway before new ones get "
        "429 (None: unlimited).",
    )
    max_streams_per_key: int | None = Field(
        None, gt=0, description="Concurrent streaming requests per API key before 429.",
    )
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After seconds sent with 429 responses."
    )
    parsers: ModelParsers = Field(
        default_factory=lambda: ModelParsers(tool_call_parser="hermes"),
        description="Default output parsers for every model.",
    )
    model_parsers: dict[str, ModelParsers] = Field(
        default_factory=dict, description="Per-model parsers, overriding `parsers`."
    )
    allow_runtime_lora_updating: bool = Field(
        True, description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
        "(vLLM's run-time LoRA endpoints; API keys apply). False refuses them.")

    def parsers_for(self, model: str) -> ModelParsers:
        return self.model_parsers.get(model, self.parsers)
    endpoint_picker: bool = Field(
        False,
        description="Serve the edge's endpoint picker on the gRPC port: Envoy's ext_proc "
        "asks it where a generation goes (the router's kv_aware choice, answered as "
        "x-gateway-destination-endpoint: the gateway fronting the chosen worker). "
        "`kvmesh up --edge --picker` turns it on; needs xds-protos (extra kvmesh[edge]).")

    def router_addresses(self) -> list[str]:
        """Every router replica, in order of preference."""
        listed = self.routers or self.router.split(",")
        return [a.strip() for a in listed if a.strip()]
    ready_file: Path | None = Field(
        None, description="Write {'http': url, 'grpc': addr} here once serving."
    )
    allowed_local_media_path: Path | None = Field(
        None, description="Directory whose image files chat requests may reference as "
        "file:// URLs (None: local files are refused; images come as data: URLs)."
    )
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="Tracing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,
        description="Mutual TLS on internal gRPC hops and the internal token.")

