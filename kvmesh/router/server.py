"""The router process: gRPC server with Router, health and reflection."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import start_http_server

from kvmesh.core.config import RouterConfig
from kvmesh.core.drain import InflightCalls, not_serving, wait_idle
from kvmesh.core.grpc_util import (
    add_health_and_reflection,
    bind,
    create_server,
    set_serving,
    use_security,
)
from kvmesh.core.service_main import freeze_heap, write_ready_file
from kvmesh.router import kernels
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterServer:
    def __init__(self, config: RouterConfig, ready_file: Path | None = None) -> None:
        self.config = config
        self._ready_file = ready_file
        use_security(config.security)
        self.core = RouterCore(config)
        self.lifecycle = WorkerLifecycle(self.core)
        self.servicer = RouterServicer(self.core, self.lifecycle)
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        #: Route and RouteBatch calls in flight (held for a worker slot included): what
        #: a drain awaits.
        self.inflight = InflightCalls(("Route", "RouteBatch"))
        self._metrics_http: Any = None
        self.port = 0
        self.metrics_port = 0

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> str:
        # Load (or compile, on a cold cache) the index kernels before taking traffic.
        await asyncio.to_thread(kernels.warm_up)
        if self.config.security.internal_token is None:
            log.warning("no internal token (security.internal_token or KVMESH_INTERNAL_TOKEN): "
                        "this router refuses every RegisterWorker, Heartbeat and "
                        "DeregisterWorker")
        server = create_server([self.inflight])
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)
        health = add_health_and_reflection(server, [SERVICE_NAME])
        self.port = bind(server, self.config.host, self.config.port)
        await server.start()
        await self.lifecycle.start()
        await set_serving(health, [SERVICE_NAME])
        self._health = health
        self._server = server
        ready = {"grpc": self.address}
        if self.config.metrics_port is not None:
            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, addr=self.config.host,
                registry=self.core.metrics.registry,
            )
            self.metrics_port = self._metrics_http.server_port
            ready["metrics"] = f"{self.config.host}:{self.metrics_port}"
            self.servicer.metrics_endpoint = ready["metrics"]
        freeze_heap()  # routing decisions: no collector pauses over start-up objects
        write_ready_file(self._ready_file, ready)
        log.info("router serving on %s (policy=%s)", self.address, self.config.policy)
        return self.address

    async def drain(self) -> None:
        """NOT_SERVING (gateways with other replicas go there), then the Route calls
        in flight are answered, up to ``drain_timeout_s``."""
        await not_serving(self._health)
        await wait_idle(lambda: self.inflight.count, self.config.drain_timeout_s,
                        f"router {self.address}")

    async def stop(self) -> None:
        if self._server is not None:
            await self.drain()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        await self.lifecycle.stop()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self.core.decision_log is not None:
            self.core.decision_log.close()
