"""A worker's adapters (``kvmesh.worker.lora``): on-demand loads, the LRU within the
slots, what a failed load leaves, and the KV events' adapter names."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from smg_grpc_proto.generated import common_pb2 as smg_common_pb2

from kvmesh.core.config import WorkerConfig
from kvmesh.core.errors import InvalidRequestError, ModelNotFoundError
from kvmesh.core.lora_config import ADAPTER_METADATA_KEY, LoraConfig
from kvmesh.worker.engine_args import engine_kwargs
from kvmesh.worker.lora import AdapterManager, adapter_of, name_adapter_blocks

pytestmark = pytest.mark.unit


class RecordingEngine:
    def __init__(self, refuse: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[tuple[str, int]] = []
        self.refuse = refuse
        self.held: set[int] = set()

    async def add_lora(self, name: str, lora_id: int, path: Path) -> None:
        if name in self.refuse:
            raise ValueError("bad safetensors header")
        self.calls.append(("add", lora_id))
        self.held.add(lora_id)

    async def remove_lora(self, lora_id: int) -> None:
        self.calls.append(("remove", lora_id))
        self.held.discard(lora_id)


def adapter_dir(root: Path, name: str, rank: int = 8) -> str:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return str(folder)


def local(ref: str) -> Path:
    path = Path(ref)
    if not path.exists():
        raise ModelNotFoundError(f"model {ref!r} is neither a local model folder ...")
    return path


def manager(tmp_path: Path, engine: RecordingEngine, slots: int = 2,
            changes: list[int] | None = None) -> AdapterManager:
    config = LoraConfig(max_loras=1, max_cpu_loras=slots, max_lora_rank=8, adapters={
        n: adapter_dir(tmp_path, n) for n in ("a", "b", "c")})
    return AdapterManager(config, engine, local,
                          on_change=(lambda: changes.append(1)) if changes is not None else None)


def test_loads_on_first_use_and_keeps_the_most_recently_used(tmp_path: Path) -> None:
    engine = RecordingEngine()
    changes: list[int] = []
    m = manager(tmp_path, engine, slots=2, changes=changes)

    async def run() -> None:
        ids = {n: (await m.acquire(n)).lora_id for n in ("a", "b")}
        for n in ("a", "b"):
            m.release(n)
        assert m.loaded() == ["a", "b"] and len(changes) == 2
        await m.acquire("a")  # loaded: no engine call, now the most recent
        m.release("a")
        assert engine.calls == [("add", ids["a"]), ("add", ids["b"])]
        c = await m.acquire("c")  # full: b (least recently used) goes
        m.release("c")
        assert engine.calls[-2:] == [("remove", ids["b"]), ("add", c.lora_id)]
        assert m.loaded() == ["a", "c"] and engine.held == {ids["a"], c.lora_id}

    asyncio.run(run())
    assert {name: (s.requests, s.loads) for name, s, _ in m.stats()} == {
        "a": (2, 1), "b": (1, 1), "c": (1, 1)}


def test_an_adapter_in_use_is_evicted_last(tmp_path: Path) -> None:
    engine = RecordingEngine()
    m = manager(tmp_path, engine, slots=2)

    async def run() -> None:
        await m.acquire("a")  # still running
        await m.acquire("b")
        m.release("b")
        await m.acquire("c")
        assert m.loaded() == ["a", "c"]

    asyncio.run(run())


def test_unknown_adapters_and_bad_sources_say_which_adapter(tmp_path: Path) -> None:
    engine = RecordingEngine(refuse={"corrupt"})
    m = manager(tmp_path, engine)
    not_adapter = tmp_path / "model"
    not_adapter.mkdir()
    (not_adapter / "config.json").write_text("{}")

    async def run() -> None:
        with pytest.raises(ModelNotFoundError, match="`zzz` is not served"):
            await m.acquire("zzz")
        with pytest.raises(ModelNotFoundError, match="`ghost`") as missing:
            await m.load("ghost", str(tmp_path / "nowhere"))
        assert missing.value.param == "lora_path"
        with pytest.raises(InvalidRequestError, match="not a LoRA adapter"):
            await m.load("model", str(not_adapter))
        with pytest.raises(InvalidRequestError, match="rank 64, above max_lora_rank 8"):
            await m.load("big", adapter_dir(tmp_path, "big", rank=64))
        with pytest.raises(InvalidRequestError,
                           match="`corrupt` .* failed to load: bad safetensors header"):
            await m.load("corrupt", adapter_dir(tmp_path, "corrupt"))
        with pytest.raises(InvalidRequestError, match="':'"):
            await m.load("a:b", adapter_dir(tmp_path, "colon"))

    asyncio.run(run())
    # Failed loads leave nothing behind; the worker serves what it served.
    assert m.servable() == ["a", "b", "c"] and m.loaded() == []


def test_run_time_load_and_unload(tmp_path: Path) -> None:
    engine = RecordingEngine()
    m = manager(tmp_path, engine)
    source = adapter_dir(tmp_path, "late")

    async def run() -> None:
        assert await m.load("late", source) >= 0
        assert "late" in m.servable() and m.loaded() == ["late"]
        await m.load("late", source)  # same source again: fine, still loaded
        with pytest.raises(InvalidRequestError, match="already served from"):
            await m.load("late", adapter_dir(tmp_path, "other"))
        late_id = (await m.acquire("late")).lora_id
        m.release("late")
        await m.unload("late")
        assert ("remove", late_id) in engine.calls and "late" not in m.servable()
        assert m.name_of(late_id) == "late"  # its KV events may still arrive
        with pytest.raises(ModelNotFoundError):
            await m.unload("late")

    asyncio.run(run())


def test_adapter_named_in_metadata() -> None:
    assert adapter_of([("x", "1"), (ADAPTER_METADATA_KEY, "sql")]) == "sql"
    assert adapter_of(None) == "" and adapter_of([("x", "1")]) == ""


def test_stored_blocks_get_their_adapter_name() -> None:
    batch = smg_common_pb2.KvEventBatch()
    stored = batch.events.add().stored
    stored.blocks.add(block_hash=1, token_ids=[1, 2], block_size=2, lora_id=7)
    base = batch.events.add().stored
    base.blocks.add(block_hash=2, token_ids=[3, 4], block_size=2)
    name_adapter_blocks(batch, {7: "sql"}.get)
    assert batch.events[0].stored.lora_name == "sql"
    assert not batch.events[1].stored.HasField("lora_name")


def test_engine_arguments_carry_the_lora_settings(tmp_path: Path) -> None:
    config = WorkerConfig(engine={"lora": {"max_loras": 2, "max_lora_rank": 8}})
    kwargs = engine_kwargs(config, tmp_path, "m", "w0")
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"],
            kwargs["max_cpu_loras"]) == (True, 2, 8, 2)
    off = WorkerConfig(engine={"lora": {"enable_lora": False}})
    assert "enable_lora" not in engine_kwargs(off, tmp_path, "m", "w0")
    assert "enable_lora" not in engine_kwargs(WorkerConfig(), tmp_path, "m", "w0")
