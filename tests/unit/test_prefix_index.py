import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmesh.router.block_hash import chain_hashes, namespace_seed, prompt_hashes
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks

pytestmark = pytest.mark.unit
BS = 4
SEED = namespace_seed("m")


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def store(index: PrefixIndex, worker: str, tokens: list[int], engine_base: int,
          parent: int | None = None, model: str = "m") -> list[int]:
    """Store ``tokens`` as full blocks with engine hashes engine_base, engine_base+1, ..."""
    engine = [engine_base + i for i in range(len(tokens) // BS)]
    index.stored(worker, StoredBlocks(engine, tokens, BS, parent, model=model))
    return engine


@given(st.lists(st.integers(0, 50_000), min_size=0, max_size=200), st.integers(1, 8))
def test_chain_extension_equals_whole_prompt(tokens: list[int], split_blocks: int) -> None:
    whole = prompt_hashes(tokens, BS, SEED)
    head, states = chain_hashes(tokens[: split_blocks * BS], BS, SEED)
    if not states:
        return
    tail, _ = chain_hashes(tokens[split_blocks * BS:], BS, SEED, states[-1])
    assert head + tail == whole


def test_hash_depends_on_prefix_position_and_namespace() -> None:
    a = prompt_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, SEED)
    b = prompt_hashes([9, 2, 3, 4, 5, 6, 7, 8], BS, SEED)
    assert a[0] != b[0] and a[1] != b[1]  # the second block carries its prefix
    assert prompt_hashes([2, 1, 3, 4], BS, SEED) != a[:1]  # order matters
    assert prompt_hashes([1, 2, 3, 4], BS, namespace_seed("m", "lora")) != a[:1]
    assert prompt_hashes([1, 2, 3], BS, SEED) == []  # partial blocks are not cached


def test_longest_prefix_per_worker_from_events() -> None:
    index = PrefixIndex()
    tokens = list(range(100, 124))  # 6 blocks
    first = store(index, "w0", tokens[:12], 1000)             # 3 blocks
    store(index, "w0", tokens[12:20], 2000, parent=first[-1])  # +2, chained on the parent
    store(index, "w1", tokens[:8], 3000)                       # 2 blocks
    hashes = prompt_hashes(tokens, BS, SEED)
    assert index.match(hashes, ["w0", "w1", "w2"]) == {"w0": 5, "w1": 2, "w2": 0}
    other = prompt_hashes([7] * 24, BS, SEED)
    assert index.match(other, ["w0", "w1"]) == {"w0": 0, "w1": 0}


def test_unknown_parent_is_not_guessed() -> None:
    index = PrefixIndex()
    store(index, "w0", list(range(8)), 10, parent=999)
    assert index.unknown_parent_blocks == 2 and len(index) == 0


def test_removed_cleared_and_worker_removal() -> None:
    index = PrefixIndex()
    tokens = list(range(16))
    engine = store(index, "w0", tokens, 10)
    store(index, "w1", tokens, 20)
    hashes = prompt_hashes(tokens, BS, SEED)
    index.removed("w0", engine[2:3])  # evict the third block: prefix breaks there
    assert index.match(hashes, ["w0", "w1"]) == {"w0": 2, "w1": 4}
    index.clear_worker("w1")
    assert index.match(hashes, ["w1"]) == {"w1": 0}
    index.remove_worker("w0")
    assert len(index) == 0 and index.blocks("w0") == 0
    store(index, "w2", tokens, 30)  # reuses the freed slot
    assert index.match(hashes, ["w2"]) == {"w2": 4}


def test_pending_blocks_expire_unless_confirmed() -> None:
    clock = Clock()
    index = PrefixIndex(clock=clock)
    tokens = list(range(12))
    hashes = prompt_hashes(tokens, BS, SEED)
    index.mark_pending("w0", hashes, ttl_s=2.0)
    assert index.match(hashes, ["w0"]) == {"w0": 3}
    clock.now = 3
    assert index.match(hashes, ["w0"]) == {"w0": 0}
    index.mark_pending("w0", hashes, ttl_s=2.0)
    store(index, "w0", tokens, 50)  # confirmed by the engine: no longer pending
    clock.now = 10
    assert index.match(hashes, ["w0"]) == {"w0": 3}


def test_against_a_reference_model() -> None:
    """Random stores/evictions vs a brute-force per-worker set of prefixes."""
    rng = random.Random(7)
    index = PrefixIndex()
    held: dict[str, set[tuple[int, ...]]] = {"a": set(), "b": set()}
    engine_of: dict[str, dict[tuple[int, ...], int]] = {"a": {}, "b": {}}
    next_engine = 1
    prompts = [[rng.randrange(5) for _ in range(BS * 6)] for _ in range(6)]
    for _ in range(300):
        w = rng.choice("ab")
        p = rng.choice(prompts)
        n = rng.randint(1, 6)
        if rng.random() < 0.7:
            parent = None
            for k in range(1, n + 1):
                prefix = tuple(p[: k * BS])
                if prefix not in engine_of[w]:
                    engine_of[w][prefix] = next_engine
                    index.stored(w, StoredBlocks([next_engine], list(prefix[-BS:]), BS, parent,
                                                 model="m"))
                    next_engine += 1
                held[w].add(prefix)
                parent = engine_of[w][prefix]
        else:
            prefix = tuple(p[: n * BS])
            if prefix in engine_of[w]:
                index.removed(w, [engine_of[w].pop(prefix)])
                held[w].discard(prefix)
        probe = rng.choice(prompts)
        hashes = prompt_hashes(probe, BS, SEED)
        got = index.match(hashes, ["a", "b"])
        for worker in "ab":
            depth = 0
            while depth < 6 and tuple(probe[: (depth + 1) * BS]) in held[worker]:
                depth += 1
            assert got[worker] == depth


def test_pending_marks_sit_at_checkpoints() -> None:
    from kvmesh.router.marks import checkpoints

    assert checkpoints(0) == [] and checkpoints(1) == [0]
    assert checkpoints(20) == [0, 1, 3, 7, 15, 19]
    assert checkpoints(64) == [0, 1, 3, 7, 15, 31, 47, 63]
    index = PrefixIndex()
    tokens = list(range(20 * BS))
    hashes = prompt_hashes(tokens, BS, SEED)
    index.mark_pending("w0", hashes, ttl_s=2.0)
    assert index.match(hashes, ["w0"]) == {"w0": 20}
    # A prompt sharing 12 of the 20 pending blocks finds the checkpoint at 8 blocks.
    shared = prompt_hashes(tokens[: 12 * BS] + [9] * (8 * BS), BS, SEED)
    assert index.match(shared, ["w0"]) == {"w0": 8}
    # Confirmed blocks always count exactly, whatever the pending marks say.
    store(index, "w0", tokens[: 12 * BS], 500)
    assert index.match(shared, ["w0"]) == {"w0": 12}


def test_match_array_over_many_slots_and_unknown_workers() -> None:
    """Past 64 workers (several mask words), with removed slots reused, and ids the
    index never saw: each worker's depth in the order asked."""
    rng = random.Random(5)
    index = PrefixIndex()
    tokens = [rng.randrange(50_000) for _ in range(20 * BS)]
    depths: dict[str, int] = {}
    for i in range(140):
        wid = f"w{i:03d}"
        depths[wid] = rng.randrange(0, 21)
        store(index, wid, tokens[:depths[wid] * BS], 1000 * i)
    for i in (3, 70, 130):
        index.remove_worker(f"w{i:03d}")
        depths[f"w{i:03d}"] = 0
    store(index, "late", tokens[:7 * BS], 999_000)  # takes a freed slot
    depths["late"] = 7
    asked = [*rng.sample(sorted(depths), len(depths)), "never-seen"]
    hashes = prompt_hashes(tokens, BS, namespace_seed("m"))
    got = index.match_array(hashes, asked).tolist()
    assert got == [depths.get(w, 0) for w in asked]
    assert index.match(hashes, asked) == {w: depths.get(w, 0) for w in asked}


def test_a_kept_id_list_sees_slots_given_taken_and_the_table_widened() -> None:
    """match_array keeps the slots of an id list it is asked about again (a candidate
    selection's, the same object each decision): a worker that gets its first blocks,
    one removed, and the table growing past 64 slots all show on the next ask."""
    rng = random.Random(8)
    index = PrefixIndex()
    tokens = [rng.randrange(50_000) for _ in range(12 * BS)]
    hashes = prompt_hashes(tokens, BS, namespace_seed("m"))
    asked = ["a", "b", "w070"]  # one list object, asked again and again
    store(index, "a", tokens[:5 * BS], 1000)
    assert index.match_array(hashes, asked).tolist() == [5, 0, 0]
    store(index, "b", tokens[:9 * BS], 2000)  # b's first blocks: a new slot
    assert index.match_array(hashes, asked).tolist() == [5, 9, 0]
    index.remove_worker("a")
    assert index.match_array(hashes, asked).tolist() == [0, 9, 0]
    for i in range(71):  # past one mask word: w070 gets slot 71
        store(index, f"w{i:03d}", tokens[:(i % 12) * BS], 10_000 * (i + 1))
    assert index.match_array(hashes, asked).tolist() == [0, 9, 70 % 12]
    store(index, "a", tokens[:3 * BS], 3000)  # back, in a freed or new slot
    assert index.match_array(hashes, asked).tolist() == [3, 9, 70 % 12]
