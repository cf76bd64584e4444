"""One INFO line per request, with latency and tokens (the gateway's access log).

A request's line is written once both the HTTP (or gRPC) answer and the generation
behind it are done — for a stream, that is when the last token went out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvmesh.gateway.requests")


@dataclass
class RequestRecord:
    request_id: str
    started: float  # time.perf_counter() when the request arrived
    trace_id: str = ""
    endpoint: str = ""
    model: str = ""
    status: int | str = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    error: str = ""
    _pending: int = field(default=1, repr=False)

    def hold(self) -> None:
        """One more part (a generation) must finish before the line is written."""
        self._pending += 1

    def done(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self.emit()

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "endpoint": self.endpoint, "model": self.model, "status": self.status,
            "latency_s": round(time.perf_counter() - self.started, 6),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.ttft_s is not None:
            out["ttft_s"] = round(self.ttft_s, 6)
        if self.error:
            out["error"] = self.error
        return out

    def emit(self) -> None:
        f = self.fields()
        log.info(
            "request done %s %s status=%s latency=%.3fs ttft=%s prompt=%d completion=%d "
            "cached=%d%s", f["endpoint"], f["model"] or "-", f["status"], f["latency_s"],
            f"{self.ttft_s:.3f}s" if self.ttft_s is not None else "-", self.prompt_tokens,
            self.completion_tokens, self.cached_tokens,
            f" error={self.error}" if self.error else "",
            extra={"request_id": self.request_id, "trace_id": self.trace_id, "kvmesh": f},
        )
