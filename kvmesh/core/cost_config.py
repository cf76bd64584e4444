"""The router's cost model parameters (``RouterConfig.cost``; kvmesh/router/cost_model.py)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class CostParams(BaseModel):
    """The router's cost model (kvmesh/router/cost_model.py), in estimated seconds.

    Defaults were measured for SmolLM2-135M on 2 CPU cores; a bigger model or a GPU
    changes the rates (``prefill_tokens_per_s``, ``decode_step_s_per_seq``,
    ``kv_transfer_tokens_per_s``): measure them with ``kvmesh bench`` and set them here.
    """

    prefill_tokens_per_s: float = Field(
        2500.0, gt=0, description="Prompt tokens a worker prefills per second.")
    decode_step_s_per_seq: float = Field(
        0.004, ge=0, description="How much each running sequence lengthens an engine step.")
    balance_epsilon: float = Field(
        2.0, ge=0, description="Bounded load: skip workers above (1+ε)·mean active + 1.")
    backlog_weight: float = Field(
        1.0, ge=0,
        description="Price of an uncached token per request waiting on the worker, in "
        "prefill-seconds: what a miss costs the requests that will queue behind it.")
    eviction_weight: float = Field(3.0, ge=0, description=(
        "Price of evicting cached blocks, in prefill-seconds per uncached token, scaled by "
        "how full the worker's KV cache is."))
    placement_slack: float = Field(0.1, ge=0, description=(
        "Workers within this fraction of the prompt's full prefill time of the best cost "
        "count as equal; the prompt's rendezvous home wins among them."))
    pending_ttl_s: float = Field(
        120.0, gt=0,
        description="Longest routed-but-unconfirmed blocks count as cached on the chosen "
        "worker; they stop earlier when the worker's events confirm them or the request "
        "finishes, so this only bounds marks whose finish never arrives.")
    kv_transfer_tokens_per_s: float = Field(40000.0, gt=0, description=(
        "Prompt tokens' KV a decode worker pulls from a prefill worker per second (NIXL "
        "over loopback on CPU, incl. per-block overheads)."))
    pd_overhead_s: float = Field(0.03, ge=0, description=(
        "Fixed price of disaggregating: the extra prefill RPC, its token, the handshake."))
    interference_weight: float = Field(
        0.25, ge=0,
        description="Price of stalling a worker's running decodes while it prefills, per "
        "running sequence, as a fraction of the prefill time (what disaggregation avoids).")
    adapter_load_tokens: int = Field(
        256, ge=0,
        description="Price of a LoRA adapter the worker has not loaded, as the prompt tokens "
        "it could prefill meanwhile: load time × prefill_tokens_per_s (0.06 s measured for a "
        "rank-8 SmolLM2 adapter on CPU, ~150 tokens) plus the reload of the adapter it "
        "evicts. Requests for an adapter stick to workers holding it until their queues "
        "cost more than a load elsewhere.")
