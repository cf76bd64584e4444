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

from kvmesh.router.prefix_index import PrefixIndex

_U64 = np.uint64


@dataclass
class WorkerSnapshot:
    incarnation: float
    engine_hashes: np.ndarray[Any, np.dtype[np.uint64]]
    router_hashes: np.ndarray[Any, np.dtype[np.uint64]]
    totals: np.ndarray[Any, np.dtype[np.uint64]]
    blocks: np.ndarray[Any, np.dtype[np.uint32]]


Exported = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def capture(exported: Exported, incarnations: dict[str, float]) -> dict[str, WorkerSnapshot]:
    """Wrap ``PrefixIndex.export()`` with each worker's incarnation."""
    return {
        worker_id: WorkerSnapshot(incarnations.get(worker_id, 0.0), engine.view(np.uint64),
                                  router, totals, blocks)
        for worker_id, (engine, router, totals, blocks) in exported.items()
    }


def write(path: Path, snapshot: dict[str, WorkerSnapshot]) -> None:
    """Atomically write ``path`` (npz arrays + a JSON header)."""
    arrays: dict[str, Any] = {}
    workers: dict[str, dict[str, Any]] = {}
    header = {"taken_at": time.time(), "workers": workers}
    for i, (worker_id, snap) in enumerate(snapshot.items()):
        workers[worker_id] = {"key": i, "incarnation": snap.incarnation}
        arrays[f"e{i}"], arrays[f"r{i}"] = snap.engine_hashes, snap.router_hashes
        arrays[f"t{i}"], arrays[f"b{i}"] = snap.totals, snap.blocks
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def empty_view() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The exported arrays of a worker with nothing cached."""
    return (np.zeros(0, np.int64), np.zeros(0, _U64), np.zeros(0, _U64),
            np.zeros(0, np.uint32))


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
    return index.load(worker_id, snap.engine_hashes.view(np.int64), snap.router_hashes,
                      snap.totals, snap.blocks)


def same_incarnation(a: float, b: float, tolerance_s: float = 5.0) -> bool:
    return a > 0 and b > 0 and abs(a - b) <= tolerance_s
