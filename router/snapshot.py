"""Index snapshots: the router restarts with what it knew (pure file I/O + numpy).

Per worker, the engine-hash → (router hash, chain state) map is the whole truth; the
holder bitmasks are rebuilt from it. A snapshot is tagged with each worker's
incarnation (its start time): a worker that restarted since has an empty cache, so
its part is dropped instead of served as stale hits.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvmesh.router.block_hash import ChainState
from kvmesh.router.prefix_index import PrefixIndex

_U64 = np.uint64


@dataclass
class WorkerSnapshot:
    incarnation: float
    engine_hashes: np.ndarray[Any, np.dtype[np.uint64]]
    router_hashes: np.ndarray[Any, np.dtype[np.uint64]]
    totals: np.ndarray[Any, np.dtype[np.uint64]]
    blocks: np.ndarray[Any, np.dtype[np.uint32]]


Exported = dict[str, dict[int, tuple[int, ChainState]]]


def capture(exported: Exported, incarnations: dict[str, float]) -> dict[str, WorkerSnapshot]:
    """Pack ``PrefixIndex.export()`` into arrays (safe to run off the event loop)."""
    out = {}
    for worker_id, entries in exported.items():
        n = len(entries)
        engine = np.empty(n, _U64)
        router = np.empty(n, _U64)
        totals = np.empty(n, _U64)
        blocks = np.empty(n, np.uint32)
        for i, (eh, (rh, state)) in enumerate(entries.items()):
            engine[i] = eh & 0xFFFFFFFFFFFFFFFF
            router[i], totals[i], blocks[i] = rh, state.total, state.blocks
        out[worker_id] = WorkerSnapshot(incarnations.get(worker_id, 0.0), engine, router,
                                        totals, blocks)
    return out


def write(path: Path, snapshot: dict[str, WorkerSnapshot]) -> None:
    """Atomically write ``path`` (npz arrays + a JSON header)."""
    arrays: dict[str, Any] = {}
    header = {"taken_at": time.time(), "workers": {}}
    for i, (worker_id, snap) in enumerate(snapshot.items()):
        header["workers"][worker_id] = {"key": i, "incarnation": snap.incarnation}
        arrays[f"e{i}"], arrays[f"r{i}"] = snap.engine_hashes, snap.router_hashes
        arrays[f"t{i}"], arrays[f"b{i}"] = snap.totals, snap.blocks
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def read(path: Path, max_age_s: float) -> dict[str, WorkerSnapshot]:
    """The snapshot at ``path``, or nothing when it is missing, unreadable or too old."""
    try:
        with np.load(path) as data:
            header = json.loads(bytes(data["header"]).decode())
            if time.time() - header["taken_at"] > max_age_s:
                return {}
            return {
                worker_id: WorkerSnapshot(
                    meta["incarnation"], data[f"e{meta['key']}"], data[f"r{meta['key']}"],
                    data[f"t{meta['key']}"], data[f"b{meta['key']}"])
                for worker_id, meta in header["workers"].items()
            }
    except (OSError, ValueError, KeyError):
        return {}


def restore(index: PrefixIndex, worker_id: str, snap: WorkerSnapshot) -> int:
    """Load one worker's part into the index; returns blocks restored."""
    entries = {
        int(e) - (1 << 64) if int(e) >= 1 << 63 else int(e): (int(r), ChainState(int(t), int(b)))
        for e, r, t, b in zip(snap.engine_hashes.tolist(), snap.router_hashes.tolist(),
                              snap.totals.tolist(), snap.blocks.tolist(), strict=True)
    }
    return index.load(worker_id, entries)


def same_incarnation(a: float, b: float, tolerance_s: float = 5.0) -> bool:
    return a > 0 and b > 0 and abs(a - b) <= tolerance_s
