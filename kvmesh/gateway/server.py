"""The gateway process: uvicorn (OpenAI HTTP) and grpc.aio (Inference) on one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import uvicorn

import kvmesh.core.tracing as tracing
from kvmesh.core.config import GatewayConfig
from kvmesh.core.drain import not_serving, wait_idle
from kvmesh.core.grpc_util import (
    add_health_and_reflection,
    bind,
    create_server,
    set_serving,
    use_security,
)
from kvmesh.core.registration import Registration
from kvmesh.core.roles import GATEWAY, role_to_proto
from kvmesh.core.service_main import freeze_heap, write_ready_file
from kvmesh.gateway.core import GatewayCore
from kvmesh.gateway.grpc_api import InferenceServicer
from kvmesh.gateway.http.app import create_app
from kvmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's own loop: the service handles SIGINT/SIGTERM (one
    ordered stop of HTTP, gRPC and the core), so uvicorn must not take them over."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

log = logging.getLogger(__name__)
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


class GatewayServer:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        use_security(config.security)  # before the core makes its router channel
        self.core = GatewayCore(config)
        self._grpc: grpc.aio.Server | None = None
        self._health: Any = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._registrations: list[Registration] = []
        self._registering: asyncio.Task[None] | None = None
        self.http_port = 0
        self.grpc_port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.http_port}/v1"

    async def start(self) -> dict[str, str]:
        await self.core.start()
        server = create_server()
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.core), server)
        services = [SERVICE_NAME]
        if self.config.endpoint_picker:
            from kvmesh.gateway.picker import SERVICE_NAME as PICKER
            from kvmesh.gateway.picker import add_endpoint_picker

            add_endpoint_picker(server, self.core)
            services.append(PICKER)
        health = add_health_and_reflection(server, services)
        # The Inference API is a public door (like the OpenAI HTTP API), not an internal hop.
        self.grpc_port = bind(server, self.config.host, self.config.grpc_port, public=True)
        await server.start()
        await set_serving(health, services)
        self._health = health
        self._grpc = server

        # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections
        # accepted from a socket that says it is TCP. With Nagle on, a response's (or an
        # SSE chunk's) second write waited for the client's delayed ACK: +40 ms on every
        # kept-alive request and streamed chunk.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.config.host, self.config.port))
        self.http_port = sock.getsockname()[1]
        self.core.http_address = f"{self.config.host}:{self.http_port}"
        app = create_app(self.core)
        tracing.instrument_fastapi(app)
        http = _EmbeddedServer(
            uvicorn.Config(app, log_level="warning", lifespan="off",
                           timeout_graceful_shutdown=3)
        )
        self._http = http
        self._http_task = asyncio.create_task(http.serve(sockets=[sock]))
        while not http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)
        info = {"http": self.base_url, "grpc": f"{self.config.host}:{self.grpc_port}"}
        if self.config.register_with_router:
            # With every router replica: the edge may follow any of them.
            self._registrations = [Registration(router, common_pb2.WorkerInfo(
                worker_id=f"gateway-{self.core.http_address}", role=role_to_proto(GATEWAY),
                endpoint=info["grpc"], http_endpoint=self.core.http_address,
                self_registered=True), self.config.security.internal_token,
                self.config.registration_timeout_s)
                for router in self.config.router_addresses()]
            self._registering = asyncio.create_task(self._register_when_serving())
        # Every full collection would walk the start-up heap (~80k objects, ~20 ms on
        # these cores) while every stream in flight waits: out of its sight.
        freeze_heap()
        write_ready_file(self.config.ready_file, info)
        log.info("gateway serving OpenAI at %s, Inference gRPC at %s", info["http"], info["grpc"])
        return info

    async def _register_when_serving(self) -> None:
        """Into the router's gateway set (the edge's endpoints) once /health is ok (a
        model's tokenizer is loaded): a proxy that health-checks it sooner marks it
        failed and waits to ask again."""
        while not self.core.ready_models():
            await asyncio.sleep(0.05)
        for registration in self._registrations:
            registration.start()

    async def drain(self) -> None:
        """NOT_SERVING on gRPC health, 503 on /health, out of the router's gateway set
        (the edge's endpoints), then the requests in flight finish, up to
        ``drain_timeout_s``; new requests that still arrive are served."""
        self.core.draining = True
        await not_serving(self._health)
        if self._registering is not None:
            self._registering.cancel()
        if self._registrations:
            # Out of the edge's endpoint set before the listeners close.
            await asyncio.gather(*(r.stop() for r in self._registrations))
            await asyncio.sleep(self.config.drain_s)
        await wait_idle(lambda: self.core.admission.in_flight, self.config.drain_timeout_s,
                        f"gateway {self.core.http_address}")

    async def stop(self) -> None:
        if self._grpc is not None:
            await self.drain()
        if self._http is not None:
            self._http.should_exit = True
        if self._http_task is not None:
            with contextlib.suppress(Exception):
                await self._http_task
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self.core.stop()
