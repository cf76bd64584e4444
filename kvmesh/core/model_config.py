"""One model of a deployment, as a typed config (cf. Ray Serve LLM's ``LLMConfig``).

A mesh serves any number of models; each has its own worker pool: how many workers of
each role, their engine settings, the Ray resources each worker actor reserves, and the
routing policy the router uses for it. ``MeshConfig.models`` lists them
(``kvmesh.core.mesh_config``); the single-model flags of `kvmesh up` are a shorthand
that becomes one entry. Every key is checked before anything starts: unknown keys and
bad values fail with the key's path (``models.1.engine.max_model_len``).
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from kvmesh.core.config import PolicyName
from kvmesh.core.engine_config import EngineConfig, role_engine
from kvmesh.core.roles import WorkerRole

#: Schemes a model source may use (kvmesh.models.source resolves them).
SOURCE_SCHEMES = ("hf://", "s3://", "gs://")

#: Engine fields a model entry names with its own keys (``source``, ``model_id``).
_OWN_KEYS = {"model": "source", "served_model_name": "model_id"}


class RoleCounts(BaseModel):
    """How many workers of each role serve the model."""

    model_config = {"extra": "forbid"}

    both: int = Field(1, ge=0, le=64, description="Aggregated workers (prefill and decode).")
    prefill: int = Field(0, ge=0, le=64, description="Prefill workers (P pool; with decode).")
    decode: int = Field(0, ge=0, le=64, description="Decode workers (D pool; with prefill).")

    @model_validator(mode="after")
    def _some_worker(self) -> RoleCounts:
        if self.both + self.prefill + self.decode < 1:
            raise ValueError("a model needs at least one worker")
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError("prefill and decode workers come together (both or neither)")
        return self

    def total(self) -> int:
        return self.both + self.prefill + self.decode


class ModelResources(BaseModel):
    """What each of the model's worker actors reserves on the Ray cluster. Fractional
    values let several small models share one CPU or GPU."""

    model_config = {"extra": "forbid"}

    num_cpus: float | None = Field(
        None, ge=0,
        description="Ray CPUs per worker actor, fractional allowed (0.5: two workers per "
        "CPU); None: the worker template's num_cpus, capped at an equal share of this "
        "machine's CPUs (so every actor `kvmesh up` starts can be scheduled).")
    num_gpus: float | None = Field(
        None, ge=0, description="Ray GPUs per worker actor, fractional allowed; None: the "
        "worker template's num_gpus.")
    resources: dict[str, float] | None = Field(
        None, description="Custom Ray resources per worker actor, e.g. {'gpu_pool': 1}: "
        "its workers run only on nodes that offer them; None: the worker template's.")

    @field_validator("resources")
    @classmethod
    def _non_negative(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for name, amount in (value or {}).items():
            if amount < 0:
                raise ValueError(f"resource {name!r} must be >= 0, got {amount}")
        return value


class ModelConfig(BaseModel):
    """One model the mesh serves, with its own worker pool."""

    model_config = {"extra": "forbid"}

    model_id: str | None = Field(
        None, min_length=1, pattern=r"^\S+$",
        description="The name clients send as `model` (and /v1/models lists); None: the "
        "embedded model's name, the hub repo id, the last part of a bucket prefix or the "
        "folder's name.")
    source: str = Field(
        "embedded", min_length=1,
        description="Where the weights come from: a local folder, 'embedded' (SmolLM2-135M-"
        "Instruct), 'embedded-embedding' (all-MiniLM-L6-v2), 'tiny-vlm', hf://org/name[@rev], "
        "s3://bucket/prefix or gs://bucket/prefix (docs/models.md).")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="vLLM engine settings of every worker of this model; the keys given "
        "override the mesh's worker.engine, the rest inherit it. `model` and "
        "`served_model_name` are `source` and `model_id` here.")
    prefill_engine: EngineConfig | None = Field(
        None, description="Engine settings of this model's prefill workers; the keys given "
        "override `engine`.")
    decode_engine: EngineConfig | None = Field(
        None, description="Engine settings of this model's decode workers; the keys given "
        "override `engine`.")
    workers: RoleCounts = Field(
        default_factory=RoleCounts, description="Workers per role (both, prefill, decode).")
    resources: ModelResources = Field(
        default_factory=ModelResources,
        description="Ray resources each worker actor of this model reserves.")
    policy: PolicyName | None = Field(
        None, description="Routing policy for this model's requests (kv_aware, "
        "approx_prefix, power_of_two, round_robin, random); None: the router's policy.")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if "://" in value and not value.startswith(SOURCE_SCHEMES):
            raise ValueError(f"unknown scheme in {value!r}; a source is a local folder, an "
                             f"embedded model's name or {', '.join(SOURCE_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for engine in (self.engine, self.prefill_engine, self.decode_engine):
            for key, own in _OWN_KEYS.items():
                if engine is not None and key in engine.model_fields_set:
                    raise ValueError(f"engine.{key} is set by the model's `{own}` key")
        if self.pooling and (self.workers.prefill or self.workers.decode):
            raise ValueError("an embedding model (engine.runner: pooling) has no prefill/"
                             "decode split; give only workers.both")
        return self

    @property
    def pooling(self) -> bool:
        """An embedding model (vLLM's pooling runner)."""
        return self.engine.runner == "pooling"

    def role_engines(self, template: EngineConfig) -> list[tuple[WorkerRole, EngineConfig]]:
        """Every worker's role and engine settings (both, then prefill, then decode):
        ``template`` (the mesh's worker.engine) overridden by what this model sets."""
        base = role_engine(template, self.engine).model_copy(
            update={"model": self.source, "served_model_name": self.model_id})
        if self.pooling:
            # Encoder-only models (BERT) have no KV cache to reuse; vLLM's scheduler
            # refuses to start them with prefix caching on.
            base = base.model_copy(update={"enable_prefix_caching": False})
        counts = self.workers
        return (
            [(WorkerRole.both, base)] * counts.both
            + [(WorkerRole.prefill, role_engine(base, self.prefill_engine))] * counts.prefill
            + [(WorkerRole.decode, role_engine(base, self.decode_engine))] * counts.decode
        )
