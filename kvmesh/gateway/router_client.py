"""The gateway's side of the router: several replicas, failover between them, and
routing on its own while none answers (``local_route``).

Every router replica is fed the same workers (each worker registers with all of them
and each replica follows its KV events), so any one can route. A Route goes to the
first replica in the configured order that has not failed in the last
``router_retry_s``; a replica that fails (refused, reset, no answer in time: no
``grpc-status-details-bin``, the mark of an answer the router gave) is skipped for
that long and the next one is asked. With none left the gateway routes locally over
the last worker set it watched, and goes back to the routers once their retry time has
passed. The worker-set watch follows whichever replica answers.

Routes and finished reports to a replica ride in batches (``kvmesh.core.route_batch``)
on one RouteStream per replica (``kvmesh.core.route_stream``; unary RouteBatch calls
to a router without it): concurrent requests share a round trip, each keeping its own
answer or error. With tracing on, each request keeps Route/RequestFinished calls of
its own (its spans); a lost worker's report goes to every replica on calls of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import grpc
import numpy as np

import kvmesh.core.tracing as tracing
from kvmesh.core.errors import NoWorkerAvailableError
from kvmesh.core.grpc_util import ERROR_PARAM_KEY, GRPC_DETAILS_METADATA_KEY, internal_channel
from kvmesh.core.route_batch import RouteBatcher
from kvmesh.core.route_stream import RouteStreamSender, stub_batcher
from kvmesh.gateway.failover_metrics import FailoverMetrics
from kvmesh.gateway.local_route import LocalRouter
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

#: Status codes that mean the replica (or the way to it) failed, not that it answered.
_TRANSPORT_FAILURES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
})


def replica_failed(exc: grpc.aio.AioRpcError) -> bool:
    """The call failed on the way (a replica down or unreachable), as opposed to an
    error the router answered with (those carry rich status details)."""
    if exc.code() not in _TRANSPORT_FAILURES:
        return False
    metadata = exc.trailing_metadata() or ()
    return not any(key == GRPC_DETAILS_METADATA_KEY for key, _ in metadata)


class ReplicaSet:
    """Router addresses in preference order; a failed one rests for ``retry_s``."""

    def __init__(self, addresses: Sequence[str], retry_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not addresses:
            raise ValueError("at least one router address is needed")
        self.addresses = list(addresses)
        self._retry_s = retry_s
        self._clock = clock
        self._resting_until: dict[str, float] = {}

    def available(self) -> list[str]:
        now = self._clock()
        return [a for a in self.addresses if self._resting_until.get(a, 0.0) <= now]

    def failed(self, address: str) -> None:
        self._resting_until[address] = self._clock() + self._retry_s

    def succeeded(self, address: str) -> None:
        self._resting_until.pop(address, None)


#: Set by the edge's endpoint picker (kvmesh/gateway/picker.py): the worker it chose.
PREFERRED_WORKER_HEADER = "x-kvmesh-worker"
#: The worker an endpoint picker chose for the request being served (its
#: ``x-kvmesh-worker`` header): Route asks the router for it.
preferred_worker: ContextVar[str] = ContextVar("kvmesh_preferred_worker", default="")


@dataclass(frozen=True)
class Routed:
    """A decision and who made it (None: the gateway itself, no router answered)."""

    decision: router_pb2.RouteDecision
    router: str | None


class RouterClient:
    def __init__(self, addresses: Sequence[str], route_timeout_s: float, retry_s: float,
                 workers: Callable[[], tuple[list[common_pb2.WorkerInfo], set[str]]],
                 metrics: FailoverMetrics | None = None) -> None:
        """``workers``: the last watched worker set and the ids out of routing."""
        self.replicas = ReplicaSet(addresses, retry_s)
        self._channels = {a: internal_channel(a) for a in self.replicas.addresses}
        self._stubs = {a: router_pb2_grpc.RouterStub(c) for a, c in self._channels.items()}
        self._route_timeout_s = route_timeout_s
        #: Per replica: the stream its batches go out on.
        self.streams: list[RouteStreamSender] = []
        #: Per replica: its routes and finished reports coalesced into batches.
        self.batchers = {a: self._batcher(stub) for a, stub in self._stubs.items()}
        self._workers = workers
        self.local = LocalRouter()
        self.metrics = metrics or FailoverMetrics()

    def _batcher(self, stub: router_pb2_grpc.RouterStub) -> RouteBatcher:
        batcher, stream = stub_batcher(stub, self._route_timeout_s)
        assert stream is not None
        self.streams.append(stream)
        return batcher

    def known_workers(self) -> list[common_pb2.WorkerInfo]:
        """The last watched worker set."""
        return self._workers()[0]

    def stub(self, address: str) -> router_pb2_grpc.RouterStub:
        return self._stubs[address]

    async def route(self, request_id: str, model: str, token_ids: Sequence[int],
                    max_tokens: int, exclude: Sequence[str] = (),
                    preview: bool = False, adapter: str = "") -> Routed:
        """``preview``: decide, book nothing (the endpoint picker); a worker the picker
        chose for this request (``preferred_worker``) is asked for; ``adapter``: the
        request's LoRA adapter of ``model``."""
        request = router_pb2.RouteRequest(
            request_id=request_id, model=model, adapter=adapter,
            packed_token_ids=np.asarray(token_ids, dtype="<u4").tobytes(),
            max_tokens=max_tokens, exclude_worker_ids=exclude, preview=preview,
            prefer_worker_id=preferred_worker.get())
        for address in self.replicas.available():
            try:
                decision = await self._ask(address, request)
            except grpc.aio.AioRpcError as exc:
                if not (replica_failed(exc) or self._behind(exc, model)):
                    raise
                log.warning("%s: router %s failed (%s); trying the next replica",
                            request_id, address, exc.code().name)
                self.replicas.failed(address)
                self.metrics.router_failovers.labels(address).inc()
                continue
            self.replicas.succeeded(address)
            return Routed(decision, address)
        if preview:  # the picker's question: nothing to book, so nothing to answer
            raise NoWorkerAvailableError("no router answers a preview")
        workers, unreachable = self._workers()
        self.metrics.local_routes.inc()
        decision = self.local.pick(workers, model, {*exclude, *unreachable})
        log.info("%s: no router answers; routed locally to %s", request_id,
                 decision.worker.worker_id)
        return Routed(decision, None)

    def _behind(self, exc: grpc.aio.AioRpcError, model: str) -> bool:
        """The replica does not know ``model`` though the watched worker set serves it:
        it has just (re)started and its workers have not registered again yet — not the
        client's mistake, so another replica (or the gateway itself) routes it."""
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            return False
        if dict(exc.trailing_metadata() or ()).get(ERROR_PARAM_KEY) != "model":
            return False
        return any(w.model == model for w in self._workers()[0])

    async def _ask(self, address: str, request: router_pb2.RouteRequest
                   ) -> router_pb2.RouteDecision:
        """One decision from the replica: in its next RouteBatch call, or with tracing
        on, a Route call of its own (the request's span in the router is that call's).
        Either way a failure is the AioRpcError a Route call raises (a batch that fails
        on the way fails each of its requests alike: each then tries the next replica)."""
        if tracing.enabled():
            return await self._stubs[address].Route(request, timeout=self._route_timeout_s)
        return await self.batchers[address].route(request)

    async def finished(self, request_id: str, worker_id: str, router: str | None,
                       worker_failed: bool = False) -> None:
        """RequestFinished to the replica that routed the request (it booked it), with
        that replica's next RouteBatch call; a lost worker is reported on calls of its
        own to every replica that answers, so each probes it."""
        if router and not worker_failed and not tracing.enabled():
            self.batchers[router].finished(request_id, worker_id)
            return
        targets = self.replicas.available() if worker_failed else [router] if router else []
        message = router_pb2.RequestFinishedRequest(
            request_id=request_id, worker_id=worker_id, worker_failed=worker_failed)
        for address in targets:
            try:
                await self._stubs[address].RequestFinished(message,
                                                           timeout=self._route_timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.debug("RequestFinished %s to %s failed: %s", request_id, address,
                          exc.code().name)

    async def watch(self, on_set: Callable[[router_pb2.WorkerSet], None]) -> None:
        """Follow WatchWorkers forever on whichever replica answers."""
        backoff = 0.2
        while True:
            for address in self.replicas.available() or self.replicas.addresses:
                try:
                    async for worker_set in self._stubs[address].WatchWorkers(
                            router_pb2.WatchWorkersRequest()):
                        self.replicas.succeeded(address)
                        backoff = 0.2
                        on_set(worker_set)
                except grpc.aio.AioRpcError as exc:
                    log.warning("worker-set watch on router %s broken (%s)", address,
                                exc.code().name)
                    if replica_failed(exc):
                        self.replicas.failed(address)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self) -> None:
        for batcher in self.batchers.values():  # finished reports still waiting
            await batcher.close()
        for stream in self.streams:
            await stream.close()
        for channel in self._channels.values():
            await channel.close()
