"""A state-of-the-world ADS server: versioned snapshots of the edge's resources,
pushed to every connected Envoy, with ACK/NACK tracking per resource type.

``SnapshotStore.publish`` replaces the whole resource set under a new version (so a
stream never sees a cluster from one version and its endpoints from another); each
ADS stream sends, per type, the newest version it has not sent yet. Envoy answers every
response: an ACK names the version it applied; a NACK carries the error and Envoy keeps
its last good version — the stream's ``StreamState`` (``edge/acks.py``) books both, and
a NACK is logged with Envoy's error. Nothing is re-sent after a NACK: the next published
version supersedes the rejected one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, message

from kvmesh.core.errors import KvmeshError
from kvmesh.edge.acks import Answer, StreamState
from kvmesh.edge.resources import ORDER

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    version: int
    resources: dict[str, list[message.Message]]


class SnapshotStore:
    def __init__(self) -> None:
        self.snapshot = Snapshot(0, {})
        self._changed = asyncio.Condition()
        #: Each Envoy's stream (by node id): what it was sent, ACKed and NACKed.
        self.streams: dict[str, StreamState] = {}

    async def publish(self, resources: dict[str, list[message.Message]]) -> int:
        """A new consistent version of every resource; returns its version."""
        async with self._changed:
            self.snapshot = Snapshot(self.snapshot.version + 1, resources)
            self._changed.notify_all()
            return self.snapshot.version

    async def newer_than(self, version: int) -> Snapshot:
        async with self._changed:
            await self._changed.wait_for(lambda: self.snapshot.version > version)
            return self.snapshot


#: What the reader hands the stream: a request, its end (None) or why it broke.
Incoming: TypeAlias = "discovery_pb2.DiscoveryRequest | KvmeshError | None"


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    async def StreamAggregatedResources(  # type: ignore[override]
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        requests: asyncio.Queue[Incoming] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await requests.put(request)
            except KvmeshError as exc:  # an undecodable request: the stream's answer
                await requests.put(exc)
                return
            await requests.put(None)

        reader = asyncio.create_task(read())
        state = StreamState(ORDER)
        snapshot = self._store.snapshot
        try:
            while True:
                for type_url, nonce in state.due(snapshot.version):
                    yield _response(type_url, snapshot, nonce)
                request = await _next(requests, self._store, snapshot.version)
                if isinstance(request, Snapshot):
                    snapshot = request
                    continue
                if request is None:
                    return
                if isinstance(request, KvmeshError):
                    raise request
                if request.node.id and request.node.id != state.node_id:
                    state.node_id = request.node.id
                    self._store.streams[state.node_id] = state
                error = request.error_detail.message if request.HasField("error_detail") else None
                answer = state.answer(request.type_url, request.version_info,
                                      request.response_nonce, error)
                if answer is Answer.NACK:
                    log.error("Envoy %s rejected %s version %s (keeps version %s): %s",
                              state.node_id, request.type_url.rsplit(".", 1)[-1],
                              state.sent[request.type_url].version,
                              request.version_info or "none", error)
                elif answer is Answer.ACK:
                    log.debug("Envoy %s applied %s version %s", state.node_id,
                              request.type_url.rsplit(".", 1)[-1], request.version_info)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _next(requests: asyncio.Queue[Incoming], store: SnapshotStore, version: int
                ) -> Incoming | Snapshot:
    """The next request from Envoy, or a newer snapshot, whichever comes first."""
    get = asyncio.ensure_future(requests.get())
    newer = asyncio.ensure_future(store.newer_than(version))
    done, _ = await asyncio.wait({get, newer}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        newer.cancel()
        return get.result()
    get.cancel()
    return newer.result()


def _response(type_url: str, snapshot: Snapshot, nonce: str) -> discovery_pb2.DiscoveryResponse:
    packed: list[any_pb2.Any] = []
    for resource in snapshot.resources.get(type_url, ()):
        holder = any_pb2.Any()
        holder.Pack(resource)
        packed.append(holder)
    return discovery_pb2.DiscoveryResponse(
        version_info=str(snapshot.version), type_url=type_url, resources=packed, nonce=nonce)


def names(resources: Sequence[message.Message]) -> list[str]:
    """Resource names, for logs and tests."""
    return [getattr(r, "name", "") or getattr(r, "cluster_name", "") for r in resources]
