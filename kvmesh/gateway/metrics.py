"""The gateway's Prometheus metrics, served on its HTTP port at ``/metrics``.

Labels are bounded: ``model`` is a served model name or ``other`` (clients may send
anything), ``endpoint`` is a route template or gRPC method, ``status`` an HTTP status
code, ``type`` an OpenAI error type, ``reason`` a fixed auth-failure reason.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from kvmesh.gateway.pipeline import ChoiceDelta, Finished
from kvmesh.gateway.request_log import RequestRecord

T = TypeVar("T")

#: vLLM's own buckets for the same quantities, so dashboards read alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0)
OTHER = "other"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 known_models: Callable[[], Iterable[str]] = tuple) -> None:
        self.registry = registry or CollectorRegistry()
        self._also: list[CollectorRegistry] = []
        self._known_models = known_models
        r = self.registry
        if registry is None:
            ProcessCollector(registry=r)
        self.requests = Counter(
            "kvmesh_gateway_requests", "Requests answered, by model, endpoint and status",
            ["model", "endpoint", "status"], registry=r)
        self.errors = Counter(
            "kvmesh_gateway_errors", "Errors answered, by OpenAI error type",
            ["type"], registry=r)
        self.auth_failures = Counter(
            "kvmesh_gateway_auth_failures", "Requests rejected by authentication",
            ["reason"], registry=r)
        self.ttft = Histogram(
            "kvmesh_gateway_time_to_first_token_seconds",
            "Request received to first generated token", ["model"],
            buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            "kvmesh_gateway_inter_token_latency_seconds",
            "Time between generated tokens (TPOT), per token", ["model"],
            buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(
            "kvmesh_gateway_e2e_request_latency_seconds",
            "Request received to last token, generations that finished", ["model", "endpoint"],
            buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "kvmesh_gateway_prompt_tokens", "Prompt tokens of finished generations",
            ["model"], registry=r)
        self.cached_prompt_tokens = Counter(
            "kvmesh_gateway_cached_prompt_tokens",
            "Prompt tokens served from workers' prefix caches", ["model"], registry=r)
        self.generation_tokens = Counter(
            "kvmesh_gateway_generation_tokens", "Generated tokens", ["model"], registry=r)
        self.in_flight = Gauge(
            "kvmesh_gateway_in_flight_streams",
            "Generations streaming from workers right now", ["endpoint"], registry=r)

    def model_label(self, model: str | None) -> str:
        return model if model and model in set(self._known_models()) else OTHER

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def serve_also(self, registry: CollectorRegistry) -> None:
        """Expose another gateway registry (e.g. the P/D counters) on the same /metrics."""
        self._also.append(registry)

    def exposition(self) -> bytes:
        return b"".join(generate_latest(r) for r in (self.registry, *self._also))

    async def observe_generation(
        self, events: AsyncIterator[ChoiceDelta | Finished], model: str, endpoint: str,
        started: float, record: RequestRecord | None = None,
    ) -> AsyncIterator[ChoiceDelta | Finished]:
        """Pass a generation's events through, timing tokens and counting usage (into
        ``record`` too, whose log line waits for this generation to end).

        ``started`` is when the request arrived (``time.perf_counter()``)."""
        label = self.model_label(model)
        last: float | None = None
        self.in_flight.labels(endpoint).inc()
        if record is not None:
            record.hold()
        try:
            async with aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, Finished):
                        usage = event.usage
                        self.prompt_tokens.labels(label).inc(usage.prompt_tokens)
                        self.generation_tokens.labels(label).inc(usage.completion_tokens)
                        cached = (usage.prompt_tokens_details or {}).get("cached_tokens", 0)
                        self.cached_prompt_tokens.labels(label).inc(cached)
                        self.e2e.labels(label, endpoint).observe(time.perf_counter() - started)
                        if record is not None:
                            record.prompt_tokens = usage.prompt_tokens
                            record.completion_tokens = usage.completion_tokens
                            record.cached_tokens = cached
                    elif event.token_ids:
                        now = time.perf_counter()
                        if last is None:
                            self.ttft.labels(label).observe(now - started)
                            if record is not None:
                                record.ttft_s = now - started
                        else:
                            per_token = (now - last) / len(event.token_ids)
                            for _ in event.token_ids:
                                self.itl.labels(label).observe(per_token)
                        last = now
                    yield event
        except BaseException as exc:
            if record is not None:
                record.error = type(exc).__name__
            raise
        finally:
            self.in_flight.labels(endpoint).dec()
            if record is not None:
                record.done()


_active: GatewayMetrics | None = None


def activate(metrics: GatewayMetrics) -> None:
    """Make ``metrics`` the process's gateway metrics (what :func:`record_auth_failure`
    increments)."""
    global _active
    _active = metrics


def record_auth_failure(reason: str) -> None:
    """Count one request rejected by authentication. ``reason`` must come from a small
    fixed set (e.g. ``missing_key``, ``invalid_key``), never from the request."""
    if _active is not None:
        _active.auth_failure(reason)


