"""A tiny OTLP/gRPC trace receiver for tests: keeps every exported span.

It runs in its own process (``python -m tests.otlp_collector PORT_FILE SPANS_FILE``):
a gRPC server with live threads in the test process would make every later fork of
a service process race gRPC's fork handlers. Spans arrive as JSON lines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


class OtlpCollector:
    """The test side: starts the receiver process and reads what it received."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="kvm-otlp-")
        self._port_file = Path(self._dir.name) / "port"
        self._spans_file = Path(self._dir.name) / "spans.jsonl"
        self._proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self) -> OtlpCollector:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.otlp_collector", str(self._port_file),
             str(self._spans_file)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self._port_file.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("OTLP test collector did not start")
            time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{self._port_file.read_text().strip()}"
        return self

    @property
    def spans(self) -> list[ReceivedSpan]:
        if not self._spans_file.exists():
            return []
        lines = self._spans_file.read_text().splitlines()
        return [ReceivedSpan(**json.loads(line)) for line in lines if line.endswith("}")]

    @property
    def raw(self) -> bytes:
        """Every export request as received (serialized protobuf, concatenated): spans
        with their events, links, status and resource, for tests that grep them."""
        raw = self._spans_file.with_suffix(".bin")
        return raw.read_bytes() if raw.exists() else b""

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._dir.cleanup()


def _serve(port_file: Path, spans_file: Path) -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    lock = threading.Lock()

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            lines = []
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes: dict[str, Any] = {}
                        for a in span.attributes:
                            kind = a.value.WhichOneof("value")
                            attributes[a.key] = getattr(a.value, kind) if kind else None
                        lines.append(json.dumps({
                            "service": service, "name": span.name,
                            "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": attributes}))
            with lock, spans_file.open("a") as out:
                out.write("".join(line + "\n" for line in lines))
            with lock, spans_file.with_suffix(".bin").open("ab") as raw:
                raw.write(request.SerializeToString())
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))
