"""Run-time LoRA unloads racing a worker's join (``AdapterAdmin``), on in-memory worker
stubs: the joining worker's catch-up must not leave behind an adapter that was unloaded
everywhere meanwhile (a later load of that name would then fail on it, and be rolled
back on every worker)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvmesh.gateway.adapters import AdapterAdmin, UnloadLoraAdapterRequest
from kvmesh.gateway.catalog import ModelCatalog
from kvmesh.v1 import common_pb2, router_pb2, worker_pb2

pytestmark = pytest.mark.unit


class Worker:
    """A worker's LoraAdapters service; ``hold`` makes its next unload wait."""

    def __init__(self, adapters: dict[str, str]) -> None:
        self.adapters = dict(adapters)
        self.hold: asyncio.Event | None = None

    async def ListLoraAdapters(self, request: Any, timeout: float) -> Any:
        return worker_pb2.ListLoraAdaptersResponse(adapters=[
            worker_pb2.LoraAdapter(name=n, source=s) for n, s in self.adapters.items()])

    async def LoadLoraAdapter(self, request: Any, timeout: float) -> Any:
        await asyncio.sleep(0.01)
        self.adapters[request.lora_name] = request.lora_path
        return worker_pb2.LoadLoraAdapterResponse()

    async def UnloadLoraAdapter(self, request: Any, timeout: float) -> Any:
        if self.hold is not None:
            await self.hold.wait()
        self.adapters.pop(request.lora_name, None)
        return worker_pb2.UnloadLoraAdapterResponse()


class Mesh:
    def __init__(self, workers: dict[str, Worker]) -> None:
        self.workers = workers

    def lora_adapters(self, endpoint: str) -> Worker:
        return self.workers[endpoint]


def info(wid: str, adapters: list[str]) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(worker_id=wid, endpoint=wid, model="m", lora_slots=1,
                                 servable_adapters=adapters)


@pytest.mark.parametrize("race", ["join during the unload", "unload during the catch-up"])
async def test_an_unload_racing_a_join_leaves_the_adapter_nowhere(race: str) -> None:
    holder, joiner = Worker({"x": "/adapters/x"}), Worker({})
    catalog = ModelCatalog()
    catalog.apply(router_pb2.WorkerSet(workers=[info("a", ["x"])]))
    admin = AdapterAdmin(Mesh({"a": holder, "j": joiner}), catalog,  # type: ignore[arg-type]
                         timeout_s=5)
    workers = [info("a", ["x"]), info("j", [])]
    holder.hold = asyncio.Event()
    if race == "join during the unload":
        # The unload is out (the holder still lists `x`) when the joiner arrives.
        unload = asyncio.create_task(admin.unload(UnloadLoraAdapterRequest(lora_name="x")))
        await asyncio.sleep(0.01)
        catalog.apply(router_pb2.WorkerSet(workers=workers))
        await admin.catch_up([workers[1]], workers)
        holder.hold.set()
    else:
        # The catch-up has read the holder's list and is loading `x` onto the joiner
        # when the unload begins; the unload ends first.
        catalog.apply(router_pb2.WorkerSet(workers=workers))
        catch_up = asyncio.create_task(admin.catch_up([workers[1]], workers))
        await asyncio.sleep(0.005)
        unload = asyncio.create_task(admin.unload(UnloadLoraAdapterRequest(lora_name="x")))
        await asyncio.sleep(0)
        holder.hold.set()
        await unload
        await catch_up
    await unload
    assert holder.adapters == {} and joiner.adapters == {}
    assert "x" not in catalog.get("m").adapters
