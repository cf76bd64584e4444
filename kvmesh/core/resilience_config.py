"""Settings of the gateway's failure handling: mid-stream failover, router replicas and
per-worker circuit breaking (docs/reliability.md).

They are sections of ``GatewayConfig`` (``failover``, ``outlier``); the router replicas
themselves are ``GatewayConfig.routers``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class FailoverConfig(BaseModel):
    """What the gateway does when a worker or a router goes away under a request."""

    model_config = {"extra": "forbid"}

    max_attempts: int = Field(
        3, ge=1, le=10,
        description="Workers one generation may run on: the first, then one per worker "
        "lost (before its first token: the request again; after it: a continuation from "
        "the prompt plus the tokens already sent). 1 turns failover off.")
    resume_mid_stream: bool = Field(
        True, description="Resume a generation whose worker died after its first token on "
        "another worker (n = 1, no structured output, no presence/frequency penalty); "
        "false ends such a stream with an `unavailable` error instead.")
    router_retry_s: float = Field(
        1.0, gt=0,
        description="A router replica that failed (refused, reset, no answer in "
        "route_timeout_s) is skipped for this long; with none left the gateway routes "
        "on its own (power of two over the last worker set) and tries the routers again "
        "after this delay.")


class OutlierConfig(BaseModel):
    """Per-worker circuit breaking, as Envoy's outlier detection: a worker whose calls
    failed ``consecutive_failures`` times in a row is ejected (the gateway asks the
    router to route around it, and skips it when routing on its own) for
    ``base_ejection_s`` × the number of times it was ejected, at most
    ``max_ejection_s``; the next call after that is its trial."""

    model_config = {"extra": "forbid"}

    consecutive_failures: int = Field(
        3, ge=0,
        description="Failures in a row (connection refused or reset, deadline, internal "
        "error; never a client's own error) that eject a worker; 0 turns ejection off.")
    base_ejection_s: float = Field(
        5.0, gt=0, description="Length of a first ejection; the n-th lasts n times as long.")
    max_ejection_s: float = Field(
        60.0, gt=0, description="Longest ejection, however often the worker was ejected.")
    max_ejection_percent: int = Field(
        50, ge=0, le=100,
        description="Never more than this share of the known workers ejected at once "
        "(at least one may always be): a mesh-wide fault must not empty the pool.")
