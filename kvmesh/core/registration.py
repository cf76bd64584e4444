"""Keeps a worker — or a gateway replica — registered with the router: register,
heartbeat, re-register when the router forgot it, deregister on stop. Gateways register
the same way (role GATEWAY) so that the edge's control plane finds them in WatchWorkers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc
from pydantic import SecretStr

from kvmesh.core.grpc_util import internal_channel
from kvmesh.core.internal_auth import token_metadata
from kvmesh.core.security_config import INTERNAL_TOKEN_ENV
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 10.0
#: A router that refuses this process's token is asked again after this long at most
#: (doubling from the first interval): a wrong or missing token is a configuration
#: error, fixed by a restart of one side, not something a tight retry loop mends.
REFUSED_RETRY_MAX_S = 30.0
#: Codes that mean the router is up and refuses us, not that it is away.
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

#: A worker's LoRA adapters as of now: (loaded, servable).
AdapterReport = Callable[[], tuple[Sequence[str], Sequence[str]]]


class Registration:
    """``adapters``, when given, is read at every registration and heartbeat, so the
    router always has the worker's current adapters (``report_now`` sends them at once)."""

    def __init__(self, router: str, info: common_pb2.WorkerInfo,
                 token: SecretStr | None, rpc_timeout_s: float = RPC_TIMEOUT_S,
                 adapters: AdapterReport | None = None) -> None:
        self._router = router
        self._timeout_s = rpc_timeout_s
        self._info = info
        self._adapters = adapters
        self._metadata = token_metadata(token)
        self._channel = internal_channel(router)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def _heartbeat(self) -> router_pb2.HeartbeatRequest:
        request = router_pb2.HeartbeatRequest(worker_id=self._info.worker_id)
        if self._adapters is not None:
            loaded, servable = self._adapters()
            request.adapters[:] = loaded
            request.servable_adapters[:] = servable
        return request

    async def report_now(self) -> None:
        """Send the current adapters now (a heartbeat), not at the next beat."""
        if not self.registered.is_set():
            return
        try:
            await self._stub.Heartbeat(self._heartbeat(), timeout=self._timeout_s,
                                       metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            log.warning("adapter report to router %s failed (%s)", self._router,
                        exc.code().name)

    async def _register(self) -> float:
        if self._adapters is not None:
            loaded, servable = self._adapters()
            self._info.adapters[:] = loaded
            self._info.servable_adapters[:] = servable
        reply = await self._stub.RegisterWorker(
            router_pb2.RegisterWorkerRequest(worker=self._info), timeout=self._timeout_s,
            metadata=self._metadata,
        )
        log.info("registered with router %s as %s", self._router, reply.worker.worker_id)
        self.registered.set()
        return reply.heartbeat_interval_s

    async def _run(self) -> None:
        interval = 1.0
        known = False
        refused = 0
        while True:
            wait = interval
            try:
                if not known:
                    interval = await self._register()
                    known = True
                else:
                    reply = await self._stub.Heartbeat(self._heartbeat(),
                                                       timeout=self._timeout_s,
                                                       metadata=self._metadata)
                    if not reply.known:
                        log.warning("router %s forgot this worker; registering again",
                                    self._router)
                        known = False
                        continue
                refused = 0
            except grpc.aio.AioRpcError as exc:
                known = False
                if exc.code() in _REFUSED:
                    refused += 1
                    wait = min(interval * 2 ** refused, REFUSED_RETRY_MAX_S)
                    if refused == 1:
                        log.error(
                            "router %s refused to register %s (%s: %s): give both the "
                            "same internal token (security.internal_token or %s); asking "
                            "again every %.0f s at most", self._router,
                            self._info.worker_id, exc.code().name, exc.details(),
                            INTERNAL_TOKEN_ENV, REFUSED_RETRY_MAX_S)
                else:
                    refused = 0
                    log.warning("router %s unreachable (%s); retrying", self._router,
                                exc.code().name)
            await asyncio.sleep(wait)

    async def drain(self) -> None:
        """Ask the router to route nothing new here; heartbeats go on (the lease must
        outlive the drain) and a re-registration says ``draining`` too."""
        self._info.draining = True
        try:
            reply = await self._stub.DrainWorker(
                router_pb2.DrainWorkerRequest(worker_id=self._info.worker_id),
                timeout=self._timeout_s, metadata=self._metadata)
            log.info("draining at router %s (%d routed requests in flight)", self._router,
                     reply.in_flight)
        except grpc.aio.AioRpcError as exc:
            log.warning("router %s did not take the drain (%s); health says NOT_SERVING",
                        self._router, exc.code().name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub.DeregisterWorker(
                router_pb2.DeregisterWorkerRequest(worker_id=self._info.worker_id),
                timeout=min(self._timeout_s, 2.0), metadata=self._metadata,
            )
        await self._channel.close()
