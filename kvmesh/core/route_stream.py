"""RouteBatch calls over one long-lived ``Router.RouteStream`` (the gateway's side).

A unary gRPC call costs a Python router about twice what a message on an open stream
costs (call setup, HTTP/2 headers and trailers, the interceptors' chain, a task per
call: ``python -m kvmesh.bench.grpc_floor``). ``RouteStreamSender.send`` has the
signature of the RouteBatcher's ``send``: it writes the batch on the replica's stream
(opened on first use, again after it ends) and waits for the answer that carries its
``batch_id``, up to the batch's timeout. Failures look like the unary call's: a stream
that ends or breaks fails its outstanding batches with its status (UNAVAILABLE when
the router closed it cleanly), a timeout with DEADLINE_EXCEEDED, and neither carries
rich status details, so the gateway tries the next replica. A router without
RouteStream (UNIMPLEMENTED) is sent unary RouteBatch calls from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import grpc

from kvmesh.core.route_batch import RouteBatcher, SendBatch
from kvmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

#: Opens the stream: ``stub.RouteStream`` (a stream-stream call, nothing sent yet).
OpenStream = Callable[[], Any]


def _status(code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), message)


class RouteStreamSender:
    """Batches out on one stream, answers matched by ``batch_id``."""

    def __init__(self, open_stream: OpenStream, fallback: SendBatch) -> None:
        self._open_stream = open_stream
        self._fallback = fallback
        self._call: Any = None
        #: batch_id -> (its answer, the stream it went out on).
        self._pending: dict[int, tuple[asyncio.Future[router_pb2.RouteBatchResponse],
                                       Any]] = {}
        self._ids = itertools.count(1)
        self._writing = asyncio.Lock()
        self._readers: set[asyncio.Task[None]] = set()
        #: The router answered UNIMPLEMENTED: unary RouteBatch calls from then on.
        self.unsupported = False
        #: Streams opened (a new one after each that ended).
        self.opened = 0

    async def send(self, request: router_pb2.RouteBatchRequest, timeout: float
                   ) -> router_pb2.RouteBatchResponse:
        if self.unsupported:
            return await self._fallback(request, timeout)
        call = self._call if self._call is not None else self._open()
        batch_id = next(self._ids)
        request.batch_id, request.timeout_s = batch_id, timeout
        answer: asyncio.Future[router_pb2.RouteBatchResponse] = (
            asyncio.get_running_loop().create_future())
        self._pending[batch_id] = (answer, call)
        try:
            return await asyncio.wait_for(self._exchange(call, request, answer), timeout)
        except TimeoutError:
            raise _status(grpc.StatusCode.DEADLINE_EXCEEDED,
                          "Deadline Exceeded (route stream)") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            if not self.unsupported:
                log.info("router has no RouteStream; sending unary RouteBatch calls")
            self.unsupported = True
            return await self._fallback(request, timeout)
        finally:
            self._pending.pop(batch_id, None)

    async def _exchange(self, call: Any, request: router_pb2.RouteBatchRequest,
                        answer: asyncio.Future[router_pb2.RouteBatchResponse]
                        ) -> router_pb2.RouteBatchResponse:
        async with self._writing:
            written = False
            try:
                await call.write(request)
                written = True
            except asyncio.InvalidStateError as exc:  # ended before this write
                raise _status(grpc.StatusCode.UNAVAILABLE, "the route stream ended") from exc
            finally:
                if not written and not answer.done():
                    # A write cut short (timeout, cancel) leaves the stream in no
                    # known state: it is dropped, its batches fail, the next opens anew.
                    self._drop(call)
        return await answer

    def _open(self) -> Any:
        self._call = call = self._open_stream()
        self.opened += 1
        reader = asyncio.get_running_loop().create_task(self._read(call))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return call

    def _drop(self, call: Any) -> None:
        if self._call is call:
            self._call = None
        call.cancel()

    async def _read(self, call: Any) -> None:
        error: grpc.aio.AioRpcError
        try:
            async for answer in call:
                waiting = self._pending.get(answer.batch_id)
                if waiting is not None and not waiting[0].done():
                    waiting[0].set_result(answer)
            error = _status(grpc.StatusCode.UNAVAILABLE, "the router ended the route stream")
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = _status(grpc.StatusCode.CANCELLED, "the route stream was closed")
        if self._call is call:
            self._call = None
        log.debug("route stream ended: %s", error.code().name)
        for future, on in list(self._pending.values()):
            if on is call and not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """End the stream (a gateway shutting down): its outstanding batches fail."""
        if self._call is not None:
            self._drop(self._call)
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)


def stub_batcher(stub: router_pb2_grpc.RouterStub, timeout_s: float, stream: bool = True
                 ) -> tuple[RouteBatcher, RouteStreamSender | None]:
    """A RouteBatcher to the router behind ``stub``: its batches on a RouteStream (or,
    with ``stream`` False, in unary RouteBatch calls); a request the router defers (it
    would wait for a worker slot) asked again in a Route call of its own."""

    async def unary(request: router_pb2.RouteBatchRequest, timeout: float
                    ) -> router_pb2.RouteBatchResponse:
        return await stub.RouteBatch(request, timeout=timeout)

    async def one(request: router_pb2.RouteRequest, timeout: float
                  ) -> router_pb2.RouteDecision:
        return await stub.Route(request, timeout=timeout)

    sender = RouteStreamSender(stub.RouteStream, fallback=unary) if stream else None
    return RouteBatcher(sender.send if sender else unary, timeout_s, send_one=one), sender
