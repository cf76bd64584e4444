"""Tracing and logging settings: a section of every service's settings model (in a
module of its own so that every config module can use them without a cycle)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TracingConfig(BaseModel):
    """OpenTelemetry tracing (every service has one; `kvmesh up --trace` sets all)."""

    model_config = {"extra": "forbid"}

    exporter: Literal["none", "otlp", "console"] = Field(
        "none", description="Where spans go: none (tracing off), otlp (OTLP/gRPC to "
        "otlp_endpoint) or console (stdout, for debugging).")
    otlp_endpoint: str = Field(
        "http://127.0.0.1:4317", description="OTLP/gRPC collector (e.g. the OpenTelemetry "
        "Collector, Jaeger, Tempo).")
    otlp_insecure: bool = Field(True, description="Plaintext gRPC to the collector.")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Fraction of new traces sampled; a request arriving "
        "with a sampled traceparent is always traced.")


class LoggingConfig(BaseModel):
    """Log format of a service."""

    model_config = {"extra": "forbid"}

    json_format: bool = Field(
        False, description="One JSON object per line (with request_id and trace_id) "
        "instead of plain text.")
