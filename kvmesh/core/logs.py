"""Process-wide logging setup (services call this once in their __main__).

Every record carries ``request_id`` (from :data:`request_id_var`, set per request)
and ``trace_id`` (the current OpenTelemetry span's, when tracing is on). Plain text by
default; ``json_format`` writes one JSON object per line, with any ``extra={"kvmesh":
{...}}`` fields merged in (the gateway's per-request line uses that).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "kvmesh_request_id", default="")


def _trace_id() -> str:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``trace_id`` to every record (explicit extras win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        if not getattr(record, "trace_id", ""):
            record.trace_id = _trace_id()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{k}={v}" for k in ("request_id", "trace_id") if (v := getattr(record, k, ""))]
        return f"{line} [{' '.join(ids)}]" if ids else line


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            if value := getattr(record, key, ""):
                entry[key] = value
        fields = getattr(record, "kvmesh", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str | None = None, json_format: bool = False) -> None:
    """(Re)configure the root logger: level, format, request/trace ids."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service) if json_format else TextFormatter(service))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_kvmesh", False):
            root.removeHandler(old)
    handler._kvmesh = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("KVMESH_LOG_LEVEL", "INFO")).upper())
