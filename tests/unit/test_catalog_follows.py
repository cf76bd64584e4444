"""The gateway's model list follows the router's worker set both ways: a model is
listed when its first worker registers and forgotten (tokenizer too) when its last
one leaves, so a pool re-added under the same id with other weights is loaded anew."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.gateway.catalog import ModelCatalog, ModelEntry, follow
from kvmesh.gateway.tokenizers import TokenizerStore
from kvmesh.v1 import common_pb2, router_pb2

pytestmark = pytest.mark.unit


def worker_set(version: int, *models: str) -> router_pb2.WorkerSet:
    return router_pb2.WorkerSet(version=version, workers=[
        common_pb2.WorkerInfo(worker_id=f"{m}-0", endpoint=f"127.0.0.1:{i + 1}", model=m,
                              max_context_length=1024) for i, m in enumerate(models)])


def test_models_come_and_go_with_their_workers() -> None:
    catalog = ModelCatalog()
    seen: list[tuple[str, str]] = []

    def new(entry: ModelEntry) -> None:
        seen.append(("new", entry.name))

    # What the gateway does with each worker set the router streams (one per change).
    on_set = follow(catalog, new, lambda m: seen.append(("gone", m)))
    for worker_set_ in (worker_set(1, "a"), worker_set(2, "a", "b"), worker_set(3, "b"),
                        worker_set(4, "a", "b")):
        on_set(worker_set_)
    assert catalog.version == 4
    assert seen == [("new", "a"), ("new", "b"), ("gone", "a"), ("new", "a")]
    assert catalog.names() == ["a", "b"]


async def test_a_forgotten_model_s_tokenizer_is_loaded_again(tmp_path: Path) -> None:
    store = TokenizerStore(tmp_path)
    loads: list[str] = []

    async def load(model: str, endpoints: list[str]) -> object:
        loads.append(endpoints[0])
        return object()

    store._load = load  # type: ignore[method-assign]  # no worker here: count the loads
    first = await store.get("a", ["old:1"])
    assert await store.get("a", ["old:1"]) is first and loads == ["old:1"]
    store.forget("a")
    assert not store.ready("a")
    assert await store.get("a", ["new:1"]) is not first and loads == ["old:1", "new:1"]
