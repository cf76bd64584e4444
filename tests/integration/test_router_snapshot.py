"""The router restores a worker's index view from a snapshot only for the same
incarnation of that worker (in-process servers on free ports, fake engine)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvmesh.core.config import RouterConfig, WorkerConfig
from kvmesh.core.internal_auth import token_metadata
from kvmesh.router import snapshot
from kvmesh.router.server import RouterServer
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from kvmesh.worker.worker import WorkerServer

pytestmark = pytest.mark.integration


def fake_view(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exported-index arrays: engine hashes, router hashes, chain sums, chain lengths."""
    return (np.arange(1000, 1000 + n, dtype=np.int64), np.arange(5000, 5000 + n, dtype=np.uint64),
            np.arange(1, n + 1, dtype=np.uint64) * np.uint64(77),
            np.arange(1, n + 1, dtype=np.uint32))


async def indexed_after_registration(tmp_path: Path, incarnation_shift: float) -> int:
    worker = WorkerServer(WorkerConfig(engine_kind="fake", run_dir=tmp_path))
    info = await worker.start()
    path = tmp_path / "index.npz"
    started = time.time()  # the fake reports uptime since it was built, ~now
    snapshot.write(path, snapshot.capture(
        {info["worker_id"]: fake_view(6)}, {info["worker_id"]: started + incarnation_shift}))
    router = RouterServer(RouterConfig(port=0, metrics_port=None, snapshot_path=path))
    address = await router.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            await stub.RegisterWorker(router_pb2.RegisterWorkerRequest(
                worker=common_pb2.WorkerInfo(endpoint=info["endpoint"])),
                metadata=token_metadata(router.config.security.internal_token))
            reply = await stub.ListWorkers(router_pb2.ListWorkersRequest())
            return int(reply.workers[0].indexed_blocks)
    finally:
        await router.stop()
        await worker.stop()


async def test_same_incarnation_is_restored(tmp_path: Path) -> None:
    assert await indexed_after_registration(tmp_path, 0.0) == 6


async def test_restarted_worker_is_not_restored(tmp_path: Path) -> None:
    assert await indexed_after_registration(tmp_path, -3600.0) == 0


async def test_router_writes_a_snapshot_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "out.npz"
    router = RouterServer(RouterConfig(port=0, metrics_port=None, snapshot_path=path))
    await router.start()
    router.core.index.load("w", *fake_view(3))
    await router.stop()
    assert sorted(snapshot.read(path, 60)["w"].engine_hashes.tolist()) == [1000, 1001, 1002]


async def test_worker_registers_with_every_router_replica(tmp_path: Path) -> None:
    routers = [RouterServer(RouterConfig(port=0, metrics_port=None)) for _ in range(2)]
    addresses = [await r.start() for r in routers]
    worker = WorkerServer(WorkerConfig(engine_kind="fake", run_dir=tmp_path,
                                       router=",".join(addresses)))
    info = await worker.start()
    try:
        await worker.wait_registered()
        for router in routers:
            assert [w.worker_id for w in router.core.registry.all()] == [info["worker_id"]]
            assert info["worker_id"] in router.lifecycle.followers
    finally:
        await worker.stop()
        for router in routers:
            await router.stop()


async def test_router_freezes_its_startup_heap(tmp_path: Path) -> None:
    """Once started (snapshot restored), the router's long-lived objects are out of the
    collector's passes (gc.freeze), keeping its pauses off routing decisions."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    router = RouterServer(RouterConfig(port=0, metrics_port=None))
    await router.start()
    try:
        assert gc.get_freeze_count() > 1000
    finally:
        await router.stop()
        gc.unfreeze()
