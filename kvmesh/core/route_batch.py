"""Route calls coalesced into RouteBatch round trips (the gateway's side of the router).

A router spends most of a Route call on gRPC's per-call work, not on the decision. The
batcher sends at once when nothing is out, and while a batch is out collects what the
next requests ask (routes and finished reports) for the next one: no timer, no added
latency when idle, and one call's cost shared by everything that arrived meanwhile
under load. A request's own failure comes back as the same ``AioRpcError`` (code,
message, details trailer) a single Route call raises, so callers handle both alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc

from kvmesh.core.grpc_util import ERROR_PARAM_KEY
from kvmesh.v1 import router_pb2

log = logging.getLogger(__name__)

#: google.rpc.Status trailer, as the router's error interceptor sends it.
DETAILS_KEY = "grpc-status-details-bin"

#: Longest a finished report waits for routes to ride with (the router's in-flight
#: count of a worker may lag a finish by this much).
FINISH_DELAY_S = 0.05
#: A finished report whose batch failed on the way is sent again after this long...
FINISH_RETRY_DELAY_S = 0.5
#: ...until this long after its first failure (a router that restarted has forgotten
#: the request anyway; one still up would count it in flight for good without it).
FINISH_RETRY_S = 30.0

SendBatch = Callable[[router_pb2.RouteBatchRequest, float], Awaitable[
    router_pb2.RouteBatchResponse]]
SendOne = Callable[[router_pb2.RouteRequest, float], Awaitable[router_pb2.RouteDecision]]


def result_error(result: router_pb2.RouteBatchResult) -> grpc.aio.AioRpcError:
    """A failed request of a batch as the AioRpcError its own Route call would raise."""
    trailing: list[tuple[str, str | bytes]] = []
    if result.status_details:
        trailing.append((DETAILS_KEY, result.status_details))
    if result.param:
        trailing.append((ERROR_PARAM_KEY, result.param))
    return grpc.aio.AioRpcError(
        grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == result.code)),
        grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), result.message)


class RouteBatcher:
    """Coalesces concurrent Route calls and RequestFinished reports.

    ``send`` makes one RouteBatch call (request, timeout). At most ``max_in_flight``
    batches are out at once, each with at most ``max_batch`` routes. With ``send_one``
    (one Route call), a request that would wait at the router for a worker slot
    (admission) does not hold its batch: the router answers it ``deferred`` and it is
    asked again on a Route call of its own, which waits there.
    """

    def __init__(self, send: SendBatch, timeout_s: float, max_batch: int = 128,
                 max_in_flight: int = 2, send_one: SendOne | None = None) -> None:
        self._send = send
        self._send_one = send_one
        self._timeout_s = timeout_s
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._routes: list[tuple[router_pb2.RouteRequest,
                                 asyncio.Future[router_pb2.RouteDecision]]] = []
        self._finished: list[router_pb2.RequestFinishedRequest] = []
        self._in_flight = 0
        self._scheduled = False
        self._finish_timer: asyncio.TimerHandle | None = None
        #: (request id, worker id) of reports being sent again -> when to give up.
        self._retry_until: dict[tuple[str, str], float] = {}
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batches sent and routes they carried (batching's effect, for tests/metrics).
        self.batches = 0
        self.routed = 0

    async def route(self, request: router_pb2.RouteRequest) -> router_pb2.RouteDecision:
        future: asyncio.Future[router_pb2.RouteDecision] = (
            asyncio.get_running_loop().create_future())
        self._routes.append((request, future))
        self._schedule()
        return await future

    def finished(self, request_id: str, worker_id: str) -> None:
        """Report a finished request (never waited for). With nothing out it goes at
        once — the router's view of the worker (in flight, pending marks) must not lag
        a finish another gateway's next request is routed on; while batches are out it
        rides with the next one, or goes on its own after ``FINISH_DELAY_S`` (or once
        ``max_batch`` reports wait), so under load a report rarely costs a round trip
        of its own."""
        self._finished.append(
            router_pb2.RequestFinishedRequest(request_id=request_id, worker_id=worker_id))
        if len(self._finished) >= self._max_batch or not self._in_flight:
            self._schedule()
        elif self._finish_timer is None:
            self._finish_timer = asyncio.get_running_loop().call_later(
                FINISH_DELAY_S, self._finish_due)

    async def close(self) -> None:
        """Send the finished reports still waiting (a gateway shutting down) and wait
        for the batches out, up to the batch timeout."""
        self._closing = True
        if self._finish_timer is not None:
            self._finish_timer.cancel()
            self._finish_timer = None
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        while (self._finished or self._tasks) and asyncio.get_running_loop().time() < deadline:
            if self._finished:
                self._schedule()
            await asyncio.sleep(0)  # the flush runs
            if self._tasks:
                await asyncio.wait(set(self._tasks),
                                   timeout=deadline - asyncio.get_running_loop().time())

    def _send_again(self, finished: list[router_pb2.RequestFinishedRequest],
                    exc: Exception) -> None:
        """Finished reports of a batch that failed on the way go out again (applying
        one twice is harmless) after ``FINISH_RETRY_DELAY_S``, for ``FINISH_RETRY_S``."""
        if self._closing:  # one try each while shutting down
            log.debug("%d finished reports not delivered at close: %r", len(finished), exc)
            return
        now = asyncio.get_running_loop().time()
        again = []
        for report in finished:
            key = (report.request_id, report.worker_id)
            if now < self._retry_until.setdefault(key, now + FINISH_RETRY_S):
                again.append(report)
            else:
                del self._retry_until[key]
                log.warning("finished report of %s on %s not delivered for %.0f s: %r",
                            report.request_id, report.worker_id, FINISH_RETRY_S, exc)
        if not again:
            return
        log.debug("%d finished reports failed on the way (%r); sending again",
                  len(again), exc)
        self._finished[:0] = again
        if self._finish_timer is not None:
            self._finish_timer.cancel()
        self._finish_timer = asyncio.get_running_loop().call_later(
            FINISH_RETRY_DELAY_S, self._finish_due)

    def _finish_due(self) -> None:
        self._finish_timer = None
        if self._finished:
            self._schedule()

    def _schedule(self) -> None:
        # Once per loop turn: every call made in this turn joins the same batch.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._finish_timer is not None and self._routes:
            self._finish_timer.cancel()  # the reports ride with these routes
            self._finish_timer = None
        while self._in_flight < self._max_in_flight and (self._routes or self._finished):
            routes = [r for r in self._routes[:self._max_batch] if not r[1].done()]
            del self._routes[:self._max_batch]
            finished, self._finished = self._finished, []
            if not routes and not finished:  # every caller gave up meanwhile
                continue
            self._in_flight += 1
            self._spawn(self._run(routes, finished))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, request: router_pb2.RouteRequest,
                   future: asyncio.Future[router_pb2.RouteDecision]) -> None:
        """A deferred request asked again on a Route call of its own."""
        assert self._send_one is not None
        try:
            decision = await self._send_one(request, self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - the caller's, as its Route raised it
            if not future.done():
                future.set_exception(exc)
        else:
            self._settle(request, future, decision)

    def _settle(self, request: router_pb2.RouteRequest,
                future: asyncio.Future[router_pb2.RouteDecision],
                decision: router_pb2.RouteDecision) -> None:
        if not future.done():
            future.set_result(decision)
        elif not request.preview:
            # The caller gave up (cancelled) after the router booked the request:
            # release it there, as the caller would have once done.
            for worker in (decision.worker, decision.prefill_worker):
                if worker.worker_id:
                    self.finished(request.request_id, worker.worker_id)

    async def _run(self, routes: list[tuple[router_pb2.RouteRequest,
                                            asyncio.Future[router_pb2.RouteDecision]]],
                   finished: list[router_pb2.RequestFinishedRequest]) -> None:
        self.batches += 1
        self.routed += len(routes)
        request = router_pb2.RouteBatchRequest(requests=[r for r, _ in routes],
                                               finished=finished,
                                               defer_waits=self._send_one is not None)
        try:
            response = await self._send(request, self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - each caller's, as its Route raised it
            if finished:
                self._send_again(finished, exc)
            for _, future in routes:
                if not future.done():
                    future.set_exception(exc)
        else:
            if self._retry_until:
                for report in finished:
                    self._retry_until.pop((report.request_id, report.worker_id), None)
            for (route, future), result in zip(routes, response.results, strict=True):
                if result.deferred and self._send_one is not None:
                    if not future.done():
                        self._spawn(self._one(route, future))
                elif result.code:
                    if not future.done():
                        future.set_exception(result_error(result))
                else:
                    self._settle(route, future, result.decision)
        finally:
            self._in_flight -= 1
            if self._routes or (self._finished and self._finish_timer is None):
                self._schedule()
