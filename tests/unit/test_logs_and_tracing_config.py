"""Log formats carry request and trace ids; one setting turns tracing on mesh-wide."""

from __future__ import annotations

import json
import logging

import pytest

from kvmesh.cli import build_parser
from kvmesh.core.config import TracingConfig
from kvmesh.core.logs import ContextFilter, JsonFormatter, TextFormatter, request_id_var
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.service_main import observability_settings
from kvmesh.launch.services import with_mesh_observability

pytestmark = pytest.mark.unit


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("kvmesh.x", logging.INFO, __file__, 1, "hello %s", ("you",),
                               None)
    for key, value in extra.items():
        setattr(record, key, value)
    ContextFilter().filter(record)
    return record


def test_json_lines_merge_request_fields() -> None:
    token = request_id_var.set("req-7")
    try:
        record = _record(kvmesh={"latency_s": 0.5, "status": 200})
    finally:
        request_id_var.reset(token)
    entry = json.loads(JsonFormatter("gateway").format(record))
    assert entry["message"] == "hello you" and entry["service"] == "gateway"
    assert entry["request_id"] == "req-7" and entry["latency_s"] == 0.5
    assert "trace_id" not in entry  # no span: no empty id


def test_text_lines_append_ids_only_when_known() -> None:
    assert TextFormatter("router").format(_record()).endswith("kvmesh.x: hello you")
    line = TextFormatter("router").format(_record(request_id="r1", trace_id="ab" * 16))
    assert line.endswith(f"hello you [request_id=r1 trace_id={'ab' * 16}]")


def test_up_flags_trace_every_service() -> None:
    args = build_parser().parse_args(
        ["up", "--trace", "otlp", "--otlp-endpoint", "http://collector:4317", "--log-json"])
    settings = observability_settings(args)
    assert settings == {"tracing": {"exporter": "otlp", "otlp_endpoint": "http://collector:4317"},
                        "logging": {"json_format": True}}
    mesh = with_mesh_observability(MeshConfig(**settings))
    for service in (mesh.router, mesh.gateway, mesh.worker):
        assert service.tracing == TracingConfig(exporter="otlp",
                                                otlp_endpoint="http://collector:4317")
        assert service.logging.json_format
    # Off by default, everywhere.
    plain = with_mesh_observability(MeshConfig())
    assert plain.router.tracing.exporter == plain.worker.tracing.exporter == "none"
    assert observability_settings(build_parser().parse_args(["up"])) == {}
