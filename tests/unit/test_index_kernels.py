"""The compiled tables under the prefix index, against plain dict/set models."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.router.block_hash import namespace_seed, prompt_hashes
from kvmesh.router.kernels import tables
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks

pytestmark = pytest.mark.unit

# Few distinct keys, so inserts and deletes collide and probe runs wrap the table.
keys = st.sampled_from([0, 1, 2, 3, 17, 2**63, 2**64 - 1, 12345, 99, 64, 65, 7])
ops = st.lists(st.tuples(st.booleans(), keys), max_size=300)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_engine_table_matches_a_dict(steps: list[tuple[bool, int]]) -> None:
    size = 16  # 12 keys at most: never full, and small enough to wrap
    table = (np.zeros(size, np.uint64), np.zeros(size, np.uint64), np.zeros(size, np.uint32))
    model: dict[int, tuple[int, int]] = {}
    for step, (insert, key) in enumerate(steps):
        engine = np.array([key], np.uint64)
        if insert:
            fresh = np.empty(1, np.bool_)
            tables.engine_put(*table, engine, np.array([step], np.uint64), step, fresh)
            assert bool(fresh[0]) == (key not in model)
            model.setdefault(key, (step, step))
        else:
            out = np.empty(1, np.uint64)
            popped = tables.engine_pop(*table, engine, out)
            assert popped == (key in model)
            if key in model:
                total, length = model.pop(key)
                assert int(out[0]) == int(tables.router_hash(np.uint64(total), length))
        for k in set(model) | {0, 1, 2}:
            total, length = tables.engine_get(*table, np.uint64(k))
            assert (int(total), int(length)) == model.get(k, (0, -1))
    engine, _, totals, lengths = tables.engine_items(*table)
    assert {int(e): (int(t), int(n)) for e, t, n in zip(engine, totals, lengths, strict=True)} \
        == model


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.integers(0, 129)), max_size=200))
def test_holder_table_matches_sets_across_many_worker_slots(
        steps: list[tuple[bool, int, int]]) -> None:
    words = 3  # 130 slots: bits in three mask words
    table = (np.zeros(32, np.uint64), np.zeros((32, words), np.uint64))
    model: dict[int, set[int]] = {}
    for add, key, slot in steps:
        word, bit = slot // 64, np.uint64(1 << (slot % 64))
        hashes = np.array([key], np.uint64)
        if add:
            seen = np.empty(1, np.bool_)
            tables.holder_set(*table, hashes, word, bit, seen)
            assert bool(seen[0]) == (slot in model.get(key, set()))
            model.setdefault(key, set()).add(slot)
        else:
            tables.holder_clear(*table, hashes, word, bit)
            model.get(key, set()).discard(slot)
            if not model.get(key):
                model.pop(key, None)
    assert int(np.count_nonzero(table[0])) == len(model)
    rows = {0 if k == tables.ZERO_KEY else int(k): table[1][i]
            for i, k in enumerate(table[0]) if k}
    for key in range(10):
        row = rows.get(key, np.zeros(words, np.uint64))
        slots = {w * 64 + b for w in range(words) for b in range(64) if int(row[w]) >> b & 1}
        assert slots == model.get(key, set())


def test_index_grows_and_matches_past_64_workers() -> None:
    """130 workers: slots past the first mask word, tables grown many times."""
    index = PrefixIndex()
    seed = namespace_seed("m")
    rng = np.random.default_rng(3)
    prompts = {f"w{i}": rng.integers(0, 1000, 64 * 8).tolist() for i in range(130)}
    engine = 1
    for worker, tokens in prompts.items():
        index.stored(worker, StoredBlocks(list(range(engine, engine + 8)), tokens, 64,
                                          model="m"))
        engine += 8
    assert len(index) == 130 * 8
    for worker in ("w0", "w64", "w129"):
        hashes = prompt_hashes(prompts[worker][: 64 * 5] + [7] * 64, 64, seed)
        got = index.match(hashes, list(prompts))
        assert got[worker] == 5 and sum(got.values()) == 5
    # Pending marks for a slot past the first word, then removal of that worker.
    fresh = prompt_hashes(list(range(64 * 4)), 64, seed)
    index.mark_pending("w129", fresh, ttl_s=2.0)
    assert index.match(fresh, ["w0", "w129"]) == {"w0": 0, "w129": 4}
    index.remove_worker("w129")
    assert index.match(fresh, ["w0", "w129"]) == {"w0": 0, "w129": 0}
    assert len(index) == 129 * 8


def test_engine_hashes_of_any_sign_and_zero_round_trip_through_export() -> None:
    index = PrefixIndex()
    tokens = list(range(12))
    index.stored("w", StoredBlocks([0, -5, 2**64 - 3], tokens, 4, model="m"))
    index.stored("w", StoredBlocks([-9], list(range(12, 16)), 4, parent_engine_hash=2**64 - 3,
                                   model="m"))
    hashes = prompt_hashes(list(range(16)), 4, namespace_seed("m"))
    assert index.match(hashes, ["w"]) == {"w": 4}
    restored = PrefixIndex()
    restored.load("w", *index.export()["w"])
    assert restored.match(hashes, ["w"]) == {"w": 4}
    restored.removed("w", [-5])  # the second block goes: the prefix stops at one block
    assert restored.match(hashes, ["w"]) == {"w": 1}
    assert restored.blocks("w") == 3


_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _reference_chain(tokens: list[int], block_size: int, seed: int, parent_total: int,
                     parent_blocks: int) -> tuple[list[int], list[int]]:
    """block_hash's formula token by token in plain Python: S_i the wrapping sum of
    f(token_k, k) up to block i's end, H_i = mix(S_i ^ (i+1)·C1)."""
    hashes, sums, total = [], [], parent_total
    position = parent_blocks * block_size
    for b in range(len(tokens) // block_size):
        for t in tokens[b * block_size:(b + 1) * block_size]:
            term = ((t * int(tables.C1)) & _M64) ^ ((position * int(tables.POS)) & _M64) ^ seed
            total = (total + _mix(term)) & _M64
            position += 1
        sums.append(total)
        hashes.append(_mix(total ^ (((parent_blocks + b + 1) * int(tables.C1)) & _M64)))
    return hashes, sums


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=300), st.integers(1, 40),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 1000))
def test_the_compiled_chain_is_the_documented_formula(
        tokens: list[int], block_size: int, seed: int, parent_total: int,
        parent_blocks: int) -> None:
    """Hashes are what snapshots and every router replica agree on: the compiled pass
    (its order of additions is the compiler's) must give the formula's values."""
    hashes, sums = tables.chain(np.array(tokens, np.uint32), block_size, np.uint64(seed),
                                np.uint64(parent_total), parent_blocks)
    want_hashes, want_sums = _reference_chain(tokens, block_size, seed, parent_total,
                                              parent_blocks)
    assert hashes.tolist() == want_hashes
    assert sums.tolist() == want_sums
