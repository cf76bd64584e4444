"""Typed configuration: one pydantic settings model per process (router, worker,
gateway, and ``MeshConfig`` for ``kvmesh up``), every field with a description.

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
from kvmesh.core.roles import WorkerRole
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
    "GatewayAddress", "CostParams", "AutoscaleConfig",
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
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs the worker actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs the worker actor reserves.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources the worker actor reserves, e.g. {'gpu_pool': 1}: "
        "it runs only on nodes that offer them (`ray start --resources`).")
    fake_token_delay_s: float = Field(
        0.005, ge=0, description="Fake engine only: seconds per generated token."
    )
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
    router: str = Field("127.0.0.1:50051", description="host:port of the router.")
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
    ready_file: Path | None = Field(
        None, description="Write {'http': url, 'grpc': addr} here once serving."
    )
    allowed_local_media_path: Path | None = Field(
        None, description="Directory whose image files chat requests may reference as "
        "file:// URLs (None: local files are refused; images come as data: URLs)."
    )
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="Tracing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")


class EmbeddingsConfig(BaseModel):
    """The embedding model `kvmesh up` serves next to the chat model."""

    model_config = {"extra": "forbid"}

    workers: int = Field(
        1, ge=0, le=16,
        description="Workers running the embedding model (vLLM pooling runner); 0 turns "
        "embeddings off.",
    )
    model: str = Field(
        "embedded-embedding",
        description="Local folder of an embedding model, 'embedded-embedding' for the "
        "packaged all-MiniLM-L6-v2, or a remote reference as for the chat model (hf://, "
        "s3://, gs://).",
    )
    max_model_len: int = Field(
        256, gt=0,
        description="Longest input in tokens (all-MiniLM-L6-v2 was trained on 256; BERT "
        "models accept at most 512).",
    )


class MeshConfig(ServiceSettings):
    """`kvmesh up`: a whole local mesh."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_", env_nested_delimiter="__")

    workers: int = Field(1, ge=0, le=64, description="Number of aggregated (both) workers.")
    prefill: int = Field(0, ge=0, le=64, description="Number of prefill workers (P pool).")
    decode: int = Field(0, ge=0, le=64, description="Number of decode workers (D pool).")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router settings.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Gateway settings.")
    worker: WorkerConfig = Field(
        default_factory=WorkerConfig, description="Template for every worker."
    )
    prefill_engine: EngineConfig | None = Field(
        None,
        description="Engine settings of prefill workers; the fields given override "
        "worker.engine (e.g. a larger kv_cache_space_gib), the rest inherit it.",
    )
    decode_engine: EngineConfig | None = Field(
        None,
        description="Engine settings of decode workers; the fields given override "
        "worker.engine (e.g. more max_num_seqs), the rest inherit it.",
    )
    embeddings: EmbeddingsConfig = Field(
        default_factory=EmbeddingsConfig,
        description="Embedding workers; they take the worker template with the embedding "
        "model and the pooling runner.",
    )
    gateways: int = Field(1, ge=1, le=16, description="Gateway replicas (behind the edge "
                          "when it is on; otherwise the first one takes gateway.port).")
    edge: EdgeConfig = Field(default_factory=EdgeConfig, description="Envoy at the edge.")
    ray_address: str | None = Field(
        None, description="Existing Ray cluster to join; None starts a local one."
    )
    placement: Literal["none", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "none",
        description="Reserve every chat and embedding worker as one Ray placement group "
        "before any starts (a gang: all or none; PACK/STRICT_PACK on as few nodes as "
        "possible, SPREAD/STRICT_SPREAD over nodes); 'none' places each actor on its own.")
    startup_timeout_s: float = Field(
        600.0, gt=0, description="How long to wait for every service to come up."
    )
    tracing: TracingConfig | None = Field(
        None, description="When set, every service (router, workers, gateway) traces with "
        "these settings, overriding their own.")
    logging: LoggingConfig | None = Field(
        None, description="When set, every service logs with these settings.")

    @model_validator(mode="after")
    def _some_worker(self) -> MeshConfig:
        if self.workers + self.prefill + self.decode < 1:
            raise ValueError("the mesh needs at least one worker")
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError("prefill and decode workers come together (both or neither)")
        return self

    def worker_roles(self) -> list[tuple[WorkerRole, EngineConfig]]:
        """Every worker's role and engine settings, both-workers first."""
        return (
            [(WorkerRole.both, self.worker.engine)] * self.workers
            + [(WorkerRole.prefill, role_engine(self.worker.engine, self.prefill_engine))]
            * self.prefill
            + [(WorkerRole.decode, role_engine(self.worker.engine, self.decode_engine))]
            * self.decode
        )


