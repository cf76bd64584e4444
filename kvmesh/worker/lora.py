"""A worker's LoRA adapters: which it may serve, which are loaded, loading on demand.

``AdapterManager`` keeps the adapters a worker can serve (name -> source, from
``LoraConfig.adapters`` and run-time loads), fetches a source once into the node cache
(``kvmesh.models.source``), loads adapters into the engine when a request first needs
them and keeps at most ``LoraConfig.slots`` loaded, evicting the least recently used
one that no running request holds. The engine is a small protocol (:class:`LoraEngine`):
vLLM's ``AsyncLLM`` behind :class:`VllmLoraEngine`, or the fake engine's stand-in.
What it holds is what the worker reports to the router (registration and heartbeats).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from smg_grpc_proto.generated import common_pb2 as smg_common_pb2

from kvmesh.core.errors import InvalidRequestError, KvmeshError, ModelNotFoundError
from kvmesh.core.lora_config import ADAPTER_METADATA_KEY, LoraConfig, check_adapter_name

log = logging.getLogger(__name__)


class LoraEngine(Protocol):
    """What the manager needs of an engine: load and unload one adapter."""

    async def add_lora(self, name: str, lora_id: int, path: Path) -> None:
        """Load the adapter (raise, saying why, when the engine refuses it)."""
        ...

    async def remove_lora(self, lora_id: int) -> None:
        ...


class VllmLoraEngine:
    """vLLM's AsyncLLM as a :class:`LoraEngine` (vLLM's ``LoRARequest``)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    async def add_lora(self, name: str, lora_id: int, path: Path) -> None:
        if not await self._engine.add_lora(lora_request(name, lora_id, path)):
            raise RuntimeError("the engine did not add it")

    async def remove_lora(self, lora_id: int) -> None:
        await self._engine.remove_lora(lora_id)


def lora_request(name: str, lora_id: int, path: Path) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))


@dataclass
class AdapterState:
    source: str
    lora_id: int
    path: Path | None = None
    requests: int = 0
    loads: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class AdapterHandle:
    """A loaded adapter a request runs with."""

    name: str
    lora_id: int
    path: Path


def adapter_rank(path: Path) -> int | None:
    """The adapter's rank ``r`` from its adapter_config.json (None when absent)."""
    try:
        rank = json.loads((path / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError):
        return None
    return rank if isinstance(rank, int) else None


class AdapterManager:
    def __init__(
        self, config: LoraConfig, engine: LoraEngine, resolve: Callable[[str], Path],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._engine = engine
        self._resolve = resolve
        self._on_change = on_change or (lambda: None)
        self._adapters: dict[str, AdapterState] = {}
        self._names_by_id: dict[int, str] = {}
        self._next_id = 1
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._lock = asyncio.Lock()
        for name, source in config.adapters.items():
            self._add(name, source)

    @property
    def slots(self) -> int:
        return self.config.slots

    def _add(self, name: str, source: str) -> AdapterState:
        state = self._adapters[name] = AdapterState(source, self._next_id)
        self._names_by_id[self._next_id] = name
        self._next_id += 1
        return state

    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    def servable(self) -> list[str]:
        return sorted(self._adapters)

    def name_of(self, lora_id: int) -> str | None:
        """The adapter an engine-side id stands for (also after it was unloaded)."""
        return self._names_by_id.get(lora_id)

    def stats(self) -> list[tuple[str, AdapterState, bool]]:
        return [(name, s, name in self._loaded) for name, s in sorted(self._adapters.items())]

    # ---- requests ------------------------------------------------------------------
    async def acquire(self, name: str) -> AdapterHandle:
        """The adapter, loaded (on demand) for one request; ``release`` it after."""
        state = self._adapters.get(name)
        if state is None:
            raise ModelNotFoundError(
                f"LoRA adapter `{name}` is not served by this worker (known: "
                f"{', '.join(self.servable()) or 'none'})", param="model")
        state.in_flight += 1
        try:
            path = await self._ensure_loaded(name, state, param="model")
        except BaseException:
            state.in_flight -= 1
            raise
        state.requests += 1
        return AdapterHandle(name, state.lora_id, path)

    def release(self, name: str) -> None:
        state = self._adapters.get(name)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    # ---- run-time loading (LoraAdapters RPCs) ---------------------------------------
    async def load(self, name: str, source: str) -> float:
        """Make ``name`` servable from ``source`` and load it now; seconds it took.
        A failed load leaves nothing behind (the name stays unknown)."""
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="lora_name") from None
        if not source.strip():
            raise InvalidRequestError(f"LoRA adapter `{name}`: lora_path is empty",
                                      param="lora_path")
        existing = self._adapters.get(name)
        if existing is not None and existing.source != source:
            raise InvalidRequestError(
                f"LoRA adapter `{name}` is already served from {existing.source!r}; unload "
                "it first", param="lora_name")
        started = time.monotonic()
        state = existing or self._add(name, source)
        try:
            await self._ensure_loaded(name, state, param="lora_path")
        except BaseException:
            if existing is None:
                self._forget(name)
            raise
        return time.monotonic() - started

    async def unload(self, name: str) -> None:
        state = self._adapters.get(name)
        if state is None:
            raise ModelNotFoundError(f"LoRA adapter `{name}` is not served by this worker",
                                     param="lora_name")
        async with self._lock:
            if name in self._loaded:
                await self._engine.remove_lora(state.lora_id)
            self._forget(name)
        self._on_change()

    def _forget(self, name: str) -> None:
        self._adapters.pop(name, None)
        self._loaded.pop(name, None)

    # ---- loading and the LRU --------------------------------------------------------
    async def _ensure_loaded(self, name: str, state: AdapterState, param: str) -> Path:
        if name in self._loaded and state.path is not None:  # no wait behind other loads
            self._loaded.move_to_end(name)
            return state.path
        async with self._lock:
            if name in self._loaded and state.path is not None:
                self._loaded.move_to_end(name)
                return state.path
            path = state.path or await self._fetch(name, state.source, param)
            changed = await self._evict_for_one()
            try:
                await self._engine.add_lora(name, state.lora_id, path)
            except KvmeshError:
                raise
            except Exception as exc:  # the engine's own reason, with the adapter's name
                log.warning("LoRA adapter %s from %s failed to load: %s", name, state.source,
                            exc)
                if changed:
                    self._on_change()
                raise InvalidRequestError(
                    f"LoRA adapter `{name}` from {state.source!r} failed to load: {exc}",
                    param=param) from None
            state.path = path
            state.loads += 1
            self._loaded[name] = None
            log.info("loaded LoRA adapter %s (id %d) from %s", name, state.lora_id, path)
        self._on_change()
        return path

    async def _fetch(self, name: str, source: str, param: str) -> Path:
        try:
            path = await asyncio.to_thread(self._resolve, source)
        except KvmeshError as exc:
            raise ModelNotFoundError(f"LoRA adapter `{name}`: {exc.message}",
                                     param=param) from None
        if not (path / "adapter_config.json").is_file():
            raise InvalidRequestError(
                f"LoRA adapter `{name}`: {source!r} is not a LoRA adapter (no "
                "adapter_config.json)", param=param)
        rank = adapter_rank(path)
        if rank is not None and rank > self.config.max_lora_rank:
            raise InvalidRequestError(
                f"LoRA adapter `{name}` has rank {rank}, above max_lora_rank "
                f"{self.config.max_lora_rank}", param=param)
        return path

    async def _evict_for_one(self) -> bool:
        """Make room for one more loaded adapter: unload the least recently used one
        no request is running with (else the least recently used)."""
        if len(self._loaded) < self.slots:
            return False
        idle = [n for n in self._loaded if self._adapters[n].in_flight == 0]
        victim = idle[0] if idle else next(iter(self._loaded))
        await self._engine.remove_lora(self._adapters[victim].lora_id)
        del self._loaded[victim]
        log.info("unloaded LoRA adapter %s (least recently used)", victim)
        return True


def adapter_of(metadata: Any) -> str:
    """The adapter a Generate call names in its gRPC metadata ('' for the base model)."""
    for key, value in metadata or ():
        if key == ADAPTER_METADATA_KEY:
            return str(value)
    return ""


def name_adapter_blocks(batch: smg_common_pb2.KvEventBatch,
                        name_of: Callable[[int], str | None]) -> None:
    """Fill each stored event's ``lora_name`` from its blocks' ``lora_id`` (the
    servicer's relay keeps only the id): the router namespaces blocks by adapter name."""
    for event in batch.events:
        if not event.HasField("stored") or event.stored.HasField("lora_name"):
            continue
        blocks = event.stored.blocks
        if blocks and blocks[0].HasField("lora_id"):
            name = name_of(blocks[0].lora_id)
            if name:
                event.stored.lora_name = name
