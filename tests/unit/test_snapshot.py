import json
import time
from pathlib import Path

import numpy as np
import pytest

from kvmesh.router import snapshot
from kvmesh.router.block_hash import namespace_seed, prompt_hashes
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks

pytestmark = pytest.mark.unit
BS = 4


def filled() -> tuple[PrefixIndex, list[int]]:
    index = PrefixIndex()
    tokens = list(range(40))
    # Engine hashes are int64 on the wire: negative ones must survive too.
    engine = [-(2**63) + 5, -1, 7, 2**63 - 1, 11, 12, 13, 14, 15, 16]
    index.stored("w0", StoredBlocks(engine, tokens, BS, None, model="m"))
    index.stored("w1", StoredBlocks([100, 101], tokens[:8], BS, None, model="m"))
    return index, tokens


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    index, tokens = filled()
    path = tmp_path / "idx.npz"
    snapshot.write(path, snapshot.capture(index.export(), {"w0": 1000.0, "w1": 2000.0}))
    saved = snapshot.read(path, max_age_s=60)
    assert set(saved) == {"w0", "w1"} and saved["w0"].incarnation == 1000.0
    fresh = PrefixIndex()
    assert snapshot.restore(fresh, "w0", saved["w0"]) == 10
    snapshot.restore(fresh, "w1", saved["w1"])
    hashes = prompt_hashes(tokens, BS, namespace_seed("m"))
    assert fresh.match(hashes, ["w0", "w1"]) == index.match(hashes, ["w0", "w1"]) == {
        "w0": 10, "w1": 2}
    # Restored chains keep extending from their engine parents.
    more = list(range(40, 48))
    fresh.stored("w0", StoredBlocks([21, 22], more, BS, parent_engine_hash=16, model="m"))
    assert fresh.match(prompt_hashes(tokens + more, BS, namespace_seed("m")), ["w0"]) == {
        "w0": 12}
    fresh.removed("w0", [-(2**63) + 5])
    assert fresh.match(hashes, ["w0"]) == {"w0": 0}


def test_stale_or_broken_snapshots_are_ignored(tmp_path: Path) -> None:
    index, _ = filled()
    path = tmp_path / "idx.npz"
    snapshot.write(path, snapshot.capture(index.export(), {}))
    assert snapshot.read(path, max_age_s=60)
    with np.load(path) as data:
        header = json.loads(bytes(data["header"]).decode())
    assert time.time() - header["taken_at"] < 60
    assert snapshot.read(path, max_age_s=-1) == {}
    (tmp_path / "junk.npz").write_bytes(b"not a snapshot")
    assert snapshot.read(tmp_path / "junk.npz", 60) == {}
    assert snapshot.read(tmp_path / "missing.npz", 60) == {}


def test_incarnation_check() -> None:
    assert snapshot.same_incarnation(1000.0, 1002.0)
    assert not snapshot.same_incarnation(1000.0, 1100.0)  # the worker restarted
    assert not snapshot.same_incarnation(0.0, 0.0)  # unknown: never trust
