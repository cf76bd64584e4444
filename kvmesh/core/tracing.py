"""OpenTelemetry tracing for every kvmesh process: off by default, one setting on.

When on, each process has a tracer provider named ``kvmesh-<service>`` exporting over
OTLP/gRPC (or to the console), and kvmesh's gRPC servers and channels carry the W3C
``traceparent`` in metadata (opentelemetry-instrumentation-grpc). Only the request
path is traced — Inference Chat/Complete, Router Route/RequestFinished, VllmEngine
Generate — not heartbeats, load probes or KV-event streams.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

from kvmesh.core.config import TracingConfig

log = logging.getLogger(__name__)

#: gRPC methods that are part of a request's path (spans and propagation).
TRACED_METHODS = ("Chat", "Complete", "Route", "RequestFinished", "Generate")

_provider: Any = None
_server_interceptors: list[Any] = []
_client_interceptors: list[Any] = []


def _method_filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.any_of(*(filters.method_name(m) for m in TRACED_METHODS))


def setup_tracing(config: TracingConfig, service: str) -> bool:
    """Install the process's tracer provider and gRPC interceptors; False when off.

    Call once, before creating gRPC servers or channels."""
    global _provider, _server_interceptors, _client_interceptors
    if config.exporter == "none" or _provider is not None:
        return _provider is not None
    from opentelemetry.instrumentation.grpc import (
        aio_client_interceptors,
        aio_server_interceptor,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"kvmesh-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    exporter: Any
    if config.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint,
                                    insecure=config.otlp_insecure)
    else:
        exporter = ConsoleSpanExporter(service_name=f"kvmesh-{service}")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    _server_interceptors = [aio_server_interceptor(provider, filter_=_method_filter())]
    _client_interceptors = aio_client_interceptors(provider, filter_=_method_filter())
    log.info("tracing on: %s exporter%s", config.exporter,
             f" to {config.otlp_endpoint}" if config.exporter == "otlp" else "")
    return True


def enabled() -> bool:
    return _provider is not None


def server_interceptors() -> list[Any]:
    return list(_server_interceptors)


def client_interceptors() -> list[Any]:
    return list(_client_interceptors)


def instrument_fastapi(app: Any) -> None:
    """Server spans for the OpenAI HTTP API (incoming ``traceparent`` honoured)."""
    if not enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=_provider, excluded_urls="metrics,health,sd/prometheus",
        exclude_spans=["receive", "send"])


def shutdown_tracing() -> None:
    """Flush spans still buffered (call when the service stops)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits, or "" outside a sampled span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
