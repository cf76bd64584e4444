"""``MeshConfig``: a whole deployment — router, gateways, the models and their pools.

A mesh lists its models (``models``, one ``ModelConfig`` each, cf. Ray Serve LLM's
``LLMConfig`` list in ``build_openai_app``). Without ``models``, the single-model keys
(``workers``/``prefill``/``decode``, ``worker.engine``, ``prefill_engine``/
``decode_engine``) are a shorthand for one entry, so `kvmesh up --workers 2` and the
existing config files keep working; mixing the two is refused, naming the key.
``embeddings`` adds the packaged embedding model (or another) as one more entry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from kvmesh.core.config import GatewayConfig, RouterConfig, WorkerConfig
from kvmesh.core.edge_config import EdgeConfig
from kvmesh.core.engine_config import EngineConfig
from kvmesh.core.model_config import ModelConfig, RoleCounts
from kvmesh.core.roles import WorkerRole
from kvmesh.core.security_config import SecurityConfig
from kvmesh.core.settings import ServiceSettings
from kvmesh.core.telemetry_config import LoggingConfig, TracingConfig

#: MeshConfig keys that describe the one model of the shorthand.
SHORTHAND_KEYS = ("workers", "prefill", "decode", "prefill_engine", "decode_engine")


class EmbeddingsConfig(BaseModel):
    """The embedding model `kvmesh up` serves next to the generative models."""

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

    def as_model(self) -> ModelConfig | None:
        """The embedding model as a ``models`` entry (None when turned off)."""
        if self.workers == 0:
            return None
        return ModelConfig(
            source=self.model, workers=RoleCounts(both=self.workers),
            # lora=None: the chat model's adapters are not the embedding model's.
            engine=EngineConfig(runner="pooling", max_model_len=self.max_model_len,
                                load_format="auto", lora=None))


class MeshConfig(ServiceSettings):
    """`kvmesh up` / `kvmesh deploy ray` / ``kvmesh.build_app``: a whole mesh."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_", env_nested_delimiter="__")

    models: list[ModelConfig] = Field(
        default_factory=list,
        description="The models served, each with its own worker pool (model_id, source, "
        "engine, workers per role, resources, policy); empty: one model from the "
        "single-model keys (workers, prefill, decode, worker.engine).")
    workers: int = Field(1, ge=0, le=64, description="Single-model shorthand: aggregated "
                         "(both) workers. With `models`, use models[].workers.both.")
    prefill: int = Field(0, ge=0, le=64, description="Single-model shorthand: prefill "
                         "workers (P pool).")
    decode: int = Field(0, ge=0, le=64, description="Single-model shorthand: decode "
                        "workers (D pool).")
    routers: int = Field(1, ge=1, le=5, description="Router replicas; every worker and "
                         "gateway is given all of them (docs/reliability.md).")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router settings "
                                 "(every replica's; snapshot_path defaults to the run dir).")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Gateway settings.")
    worker: WorkerConfig = Field(
        default_factory=WorkerConfig, description="Template for every worker (engine "
        "settings every model inherits, resources, KV transfer, engine kind)."
    )
    prefill_engine: EngineConfig | None = Field(
        None,
        description="Single-model shorthand: engine settings of prefill workers; the fields "
        "given override worker.engine (e.g. a larger kv_cache_space_gib), the rest inherit it.",
    )
    decode_engine: EngineConfig | None = Field(
        None,
        description="Single-model shorthand: engine settings of decode workers; the fields "
        "given override worker.engine (e.g. more max_num_seqs), the rest inherit it.",
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
        description="Reserve every worker the mesh starts with as one Ray placement group "
        "before any starts (a gang: all or none; PACK/STRICT_PACK on as few nodes as "
        "possible, SPREAD/STRICT_SPREAD over nodes); a model added later gets a group of "
        "its own; 'none' places each actor on its own.")
    admin_port: int | None = Field(
        0, ge=0, le=65535,
        description="Port of the mesh's admin gRPC service (kvmesh.v1.MeshAdmin: add or "
        "remove a model's pool while the mesh runs, `kvmesh models add/remove`), on the "
        "gateway's host; 0 picks a free one; None turns it off.")
    startup_timeout_s: float = Field(
        600.0, gt=0, description="How long to wait for every service to come up."
    )
    tracing: TracingConfig | None = Field(
        None, description="When set, every service (router, workers, gateway) traces with "
        "these settings, overriding their own.")
    logging: LoggingConfig | None = Field(
        None, description="When set, every service logs with these settings.")
    security: SecurityConfig | None = Field(
        None, description="When set, every service (router, workers, gateways, the edge's "
        "control plane) uses these TLS files and internal token, overriding their own. "
        "Without any internal token `kvmesh up` makes a random one for the mesh.")

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> MeshConfig:
        if self.models:
            given = [k for k in SHORTHAND_KEYS if k in self.model_fields_set]
            given += [f"worker.engine.{k}" for k in ("model", "served_model_name")
                      if k in self.worker.engine.model_fields_set]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: single-model shorthand, not allowed with `models` "
                    "(give each model its source, model_id, workers and engine there)")
        elif self.workers + self.prefill + self.decode < 1:
            raise ValueError("the mesh needs at least one worker")
        elif (self.prefill == 0) != (self.decode == 0):
            raise ValueError("prefill and decode workers come together (both or neither)")
        ids = [m.model_id for m in self.model_configs() if m.model_id is not None]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model_id {', '.join(duplicates)} is given more than once")
        return self

    def model_configs(self) -> list[ModelConfig]:
        """Every model the mesh starts with: ``models`` (or the shorthand's one model),
        then the embedding model."""
        models = list(self.models) or [ModelConfig(
            source=self.worker.engine.model, model_id=self.worker.engine.served_model_name,
            workers=RoleCounts(both=self.workers, prefill=self.prefill, decode=self.decode),
            prefill_engine=self.prefill_engine, decode_engine=self.decode_engine)]
        embedding = self.embeddings.as_model()
        return models + ([embedding] if embedding is not None else [])

    def worker_roles(self) -> list[tuple[WorkerRole, EngineConfig]]:
        """Every generative worker's role and engine settings, model by model (both,
        then prefill, then decode workers of each)."""
        return [pair for model in self.model_configs() if not model.pooling
                for pair in model.role_engines(self.worker.engine)]
