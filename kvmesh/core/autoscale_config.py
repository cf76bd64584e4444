"""Settings of the autoscaler: how many workers each pool (model, role) should have,
decided by the router from the load it already tracks (docs/autoscaling.md)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


def _ordered(low: int, high: int) -> None:
    if low > high:
        raise ValueError(f"min_workers ({low}) exceeds max_workers ({high})")


class PoolBounds(BaseModel):
    """Worker-count bounds of one pool, overriding the autoscaler's defaults."""

    model_config = {"extra": "forbid"}

    min_workers: int = Field(ge=0, description="Fewest workers the pool keeps.")
    max_workers: int = Field(ge=1, description="Most workers the pool may have.")

    @model_validator(mode="after")
    def _bounds(self) -> PoolBounds:
        _ordered(self.min_workers, self.max_workers)
        return self


class AutoscaleConfig(BaseModel):
    """Per pool (a model's workers of one role), the workers its load needs: the
    largest of running+waiting requests / target_requests_per_worker, queued prefill
    tokens / target_queued_prefill_tokens_per_worker and summed KV usage /
    target_kv_usage, kept within the pool's bounds. Up on the mean need of the last
    scale_up_window_s, down one worker at a time when the peak need of the last
    scale_down_window_s allows, each after its cooldown."""

    model_config = {"extra": "forbid"}

    enabled: bool = Field(False, description="Decide desired worker counts (exported as "
                          "kvmesh_router_desired_workers and in ListWorkers' pools).")
    min_workers: int = Field(1, ge=0, description="Fewest workers of a pool (default).")
    max_workers: int = Field(4, ge=1, description="Most workers of a pool (default).")
    pools: dict[str, PoolBounds] = Field(
        default_factory=dict,
        description="Bounds per pool, keyed 'MODEL' (every role) or 'MODEL:ROLE' (both, "
        "prefill, decode); the more specific key wins.")
    target_requests_per_worker: float = Field(
        8.0, gt=0, description="Running plus waiting requests one worker should carry.")
    target_queued_prefill_tokens_per_worker: float = Field(
        8192.0, gt=0, description="Prompt tokens waiting for prefill one worker may have "
        "queued (uncached, as workers report them plus what the router sent since).")
    target_kv_usage: float = Field(
        0.85, gt=0, le=1, description="KV-cache usage one worker should stay under.")
    tolerance: float = Field(
        0.1, ge=0, lt=1, description="No change while need/current is within 1 ± this "
        "(as Kubernetes' HPA), so a pool does not flap around a target.")
    scale_up_window_s: float = Field(
        5.0, gt=0, description="Scale up on the mean need over this many seconds.")
    scale_down_window_s: float = Field(
        30.0, gt=0, description="Scale down only when the peak need over this many "
        "seconds fits in fewer workers.")
    scale_up_cooldown_s: float = Field(
        10.0, ge=0, description="Seconds after any change before scaling up again.")
    scale_down_cooldown_s: float = Field(
        30.0, ge=0, description="Seconds after any change before scaling down again.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        _ordered(self.min_workers, self.max_workers)
        return self

    def bounds(self, model: str, role: str) -> tuple[int, int]:
        """(min, max) workers of the pool ``model``/``role``."""
        pool = self.pools.get(f"{model}:{role}") or self.pools.get(model)
        if pool is not None:
            return pool.min_workers, pool.max_workers
        return self.min_workers, self.max_workers
