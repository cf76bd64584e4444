"""How a worker runs its engine: vLLM's engine arguments and the KV transfer between
prefill and decode workers (part of ``WorkerConfig``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from kvmesh.core.lora_config import LoraConfig
from kvmesh.core.settings import DEFAULT_HOST


class EngineConfig(BaseModel):
    """How a worker runs vLLM. Fields map 1:1 to vLLM engine arguments."""

    model_config = {"extra": "forbid"}

    model: str = Field(
        "embedded",
        description="Local model folder, 'embedded' for the packaged SmolLM2-135M-Instruct, "
        "hf://org/name[@revision] (or org/name), s3://bucket/prefix or gs://bucket/prefix; "
        "remote models are fetched once per node into $KVMESH_MODEL_CACHE (docs/models.md).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use; defaults to the embedded name, the hub repo id, "
        "the last part of a bucket prefix, or the folder name."
    )
    max_model_len: int = Field(4096, gt=0, description="Context length (prompt + output).")
    block_size: int | None = Field(
        None,
        description="KV block size in tokens; None keeps the engine default "
        "(128 on CPU; CPU needs a multiple of 32).",
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks across requests.")
    enforce_eager: bool = Field(
        False, description="Skip torch.compile (faster start, ~15-20% slower decode)."
    )
    dtype: str = Field("auto", description="Model dtype (auto, bfloat16, float16, float32).")
    max_num_seqs: int | None = Field(None, gt=0, description="Max concurrently running sequences.")
    kv_cache_space_gib: float = Field(
        1.0, gt=0, description="CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    num_kv_blocks: int | None = Field(
        None, gt=0,
        description="Cap the KV cache at this many blocks (vLLM num_gpu_blocks_override); "
        "benchmarks use it to give workers a known, small capacity.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory for the engine (GPU only)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel degree.")
    seed: int = Field(0, description="Engine seed.")
    runner: Literal["auto", "generate", "pooling"] = Field(
        "auto",
        description="vLLM runner: 'generate' for chat/completion models, 'pooling' for "
        "embedding models (served through VllmEngine.Embed); 'auto' lets vLLM decide.",
    )
    load_format: str = Field(
        "auto", description="vLLM load format; 'dummy' gives random weights (plumbing tests)."
    )
    data_parallel_size: int = Field(
        1, ge=1,
        description="Data-parallel attention ranks of this engine (vLLM data_parallel_size; "
        "MoE models only). Above 1, `kvmesh up` starts that many ranks per worker as one "
        "Ray placement group (all or none), each rank its own worker endpoint in vLLM's "
        "external-load-balancer mode, so the router picks the rank (docs/data-parallel.md).")
    enable_expert_parallel: bool = Field(
        False, description="Shard the MoE experts over the data-parallel ranks instead of "
        "replicating them (vLLM enable_expert_parallel).")
    data_parallel_strategy: Literal["STRICT_PACK", "PACK"] = Field(
        "STRICT_PACK",
        description="Ray placement strategy of a DP gang: STRICT_PACK keeps every rank on "
        "one node; PACK may spread them over nodes when one cannot hold all (then set "
        "data_parallel_address to a node address the others reach).")
    data_parallel_address: str = Field(
        "127.0.0.1",
        description="Address of rank 0 where the ranks meet (vLLM data_parallel_address "
        "and master_addr); the loopback suits a STRICT_PACK gang.")
    data_parallel_rank: int | None = Field(
        None, ge=0,
        description="This rank (vLLM data_parallel_rank); set per rank by the launcher.")
    data_parallel_rpc_port: int = Field(
        0, ge=0, le=65535,
        description="Rank 0's coordination port (vLLM data_parallel_rpc_port); 0 lets the "
        "launcher pick a free one for the gang.")
    data_parallel_master_port: int = Field(
        0, ge=0, le=65535,
        description="The ranks' torch.distributed port (vLLM master_port); 0 lets the "
        "launcher pick a free one for the gang.")
    data_parallel_group: str = Field(
        "", description="Name of the gang this rank belongs to, registered with the router "
        "(set by the launcher).")
    lora: LoraConfig | None = Field(
        None, description="Multi-LoRA: vLLM's LoRA settings and the adapters (name -> "
        "source) workers load on demand; None serves the base model only (docs/models.md).")


KvConnectorName = Literal["nixl", "lmcache"]


class KvTransferConfig(BaseModel):
    """How prefill and decode workers hand KV caches over (vLLM KV connectors).

    Only ``prefill`` and ``decode`` workers get a connector; ``both`` workers serve
    aggregated requests and carry none.
    """

    model_config = {"extra": "forbid"}

    connector: KvConnectorName = Field(
        "nixl",
        description="'nixl' (vLLM NixlConnector; works on CPU) or 'lmcache' "
        "(LMCacheConnectorV1; GPU only, needs the kvmesh[lmcache] extra).",
    )
    side_channel_host: str = Field(
        DEFAULT_HOST,
        description="Address of this worker's NIXL side channel (the handshake socket "
        "decode workers connect to); registered with the router.",
    )
    side_channel_port: int = Field(
        0, ge=0, le=65535,
        description="NIXL side-channel port; 0 picks a free one at start. Every engine "
        "on a host needs its own.",
    )
    buffer_device: Literal["cpu", "cuda", "xpu"] = Field(
        "cpu", description="Where the connector stages KV for transfer (cpu on CPU hosts).")
    load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute",
        description="Decode side, when the KV transfer fails or times out: 'recompute' "
        "prefills locally instead (the request still succeeds), 'fail' errors it.",
    )
    kv_lease_s: int = Field(
        30, gt=0,
        description="Prefill side: how long finished prefills keep their KV blocks for a "
        "decode worker that has not read them yet (decode workers renew the lease "
        "while they wait).",
    )
    lmcache_config_file: Path | None = Field(
        None, description="LMCache only: its YAML config (LMCACHE_CONFIG_FILE).")


def role_engine(base: EngineConfig, override: EngineConfig | None) -> EngineConfig:
    """``base`` with the fields ``override`` sets explicitly."""
    if override is None:
        return base
    return base.model_copy(
        update={name: getattr(override, name) for name in override.model_fields_set})
