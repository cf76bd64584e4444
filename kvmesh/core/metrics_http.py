"""Serving a Prometheus registry on its own port (router and workers share this)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    """A ``/metrics`` HTTP server (prometheus-client's, on a daemon thread)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._host = host
        self._requested_port = port
        self._registry = registry
        self._server: Any = None
        self.port = 0

    def start(self) -> str:
        """Bind (port 0 picks a free one) and return ``host:port``."""
        self._server, _ = start_http_server(
            self._requested_port, addr=self._host, registry=self._registry)
        self.port = int(self._server.server_port)
        return self.address

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
