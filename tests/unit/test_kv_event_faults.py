"""KV-event faults: random fault sequences against the router's event tracker.

A simulated worker holds an LRU cache of chained blocks and publishes vLLM-shaped
``KvEventBatch``es (numbered from 0, a heartbeat repeating the last number); a link
between it and the router's ``KvEventTracker`` drops, duplicates, reorders and replays
batches; the worker restarts (new incarnation, empty cache, numbering from 0) and the
stream breaks (resumed from the cursor by a relay that replays, or refused as
OUT_OF_RANGE). Hypothesis drives the sequences. Invariant: once the router has heard
the worker's latest number (the repair window: the next batch, or the next heartbeat
~1 s later when idle), the index claims no block the worker does not hold — neither
as an engine hash in the worker's view nor as matched prefix depth for any prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smg_grpc_proto.generated import common_pb2

from kvmesh.router.block_hash import namespace_seed, prompt_hashes
from kvmesh.router.kv_events import KvEventTracker
from kvmesh.router.kv_sequence import SequenceCursors
from kvmesh.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.unit
BS = 4
MODEL = "m"
WORKER = "w0"
# Prompts sharing prefixes (block-aligned), so chains branch and parents matter.
BASE = list(range(100, 116))
PROMPTS = [BASE, BASE[:8] + list(range(200, 208)), BASE + list(range(300, 308)),
           list(range(400, 412)), BASE[:4] + list(range(500, 512))]


def engine_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Content-derived like vLLM's (same block, same hash, across restarts)."""
    h = hash((parent, tokens)) & 0x7FFF_FFFF_FFFF_FFFF
    return h or 1


@dataclass
class SimWorker:
    """An engine's prefix cache and its KV-event publisher."""

    capacity: int = 6
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)  # hash -> depth
    log: list[common_pb2.KvEventBatch] = field(default_factory=list)
    incarnation: float = 1000.0

    @property
    def seq(self) -> int:
        return len(self.log) - 1

    def _publish(self, events: list[common_pb2.KvCacheEvent]) -> common_pb2.KvEventBatch | None:
        if not events:
            return None
        batch = common_pb2.KvEventBatch(sequence_number=len(self.log), events=events)
        self.log.append(batch)
        return batch

    def heartbeat(self) -> common_pb2.KvEventBatch:
        return common_pb2.KvEventBatch(sequence_number=max(self.seq, 0),
                                       load=common_pb2.EngineLoad(load_only=True))

    def run(self, prompt: list[int]) -> common_pb2.KvEventBatch | None:
        events = []
        parent: int | None = None
        for depth in range(len(prompt) // BS):
            tokens = tuple(prompt[depth * BS:(depth + 1) * BS])
            h = engine_hash(parent, tokens)
            if h in self.cache:
                self.cache.move_to_end(h)
            else:
                self.cache[h] = depth
                stored = common_pb2.KvBlocksStored(blocks=[common_pb2.KvBlock(
                    block_hash=h, token_ids=tokens, block_size=BS)])
                if parent is not None:
                    stored.parent_block_hash = parent
                events.append(common_pb2.KvCacheEvent(stored=stored))
            parent = h
        evicted = []
        while len(self.cache) > self.capacity:
            evicted.append(self.cache.popitem(last=False)[0])
        if evicted:
            events.append(common_pb2.KvCacheEvent(
                removed=common_pb2.KvBlocksRemoved(block_hashes=evicted)))
        return self._publish(events)

    def clear(self) -> common_pb2.KvEventBatch | None:
        self.cache.clear()
        return self._publish([common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())])

    def restart(self) -> None:
        self.cache.clear()
        self.log = []
        self.incarnation += 100.0

    def cached_depth(self, prompt: list[int]) -> int:
        parent: int | None = None
        for depth in range(len(prompt) // BS):
            h = engine_hash(parent, tuple(prompt[depth * BS:(depth + 1) * BS]))
            if h not in self.cache:
                return depth
            parent = h
        return len(prompt) // BS


@dataclass
class Harness:
    worker: SimWorker = field(default_factory=SimWorker)
    index: PrefixIndex = field(default_factory=PrefixIndex)
    link: list[common_pb2.KvEventBatch] = field(default_factory=list)
    heard: int = -1  # the last number the tracker handled
    checks: int = 0

    def __post_init__(self) -> None:
        self.tracker = KvEventTracker(WORKER, self.index, MODEL, BS,
                                      incarnation=self.worker.incarnation)

    def send(self, batch: common_pb2.KvEventBatch | None) -> None:
        if batch is not None:
            self.link.append(batch)

    def deliver(self) -> None:
        if self.link:
            batch = self.link.pop(0)
            self.tracker.handle(batch)
            self.heard = batch.sequence_number
            self.check()

    def reconnect(self, relay_replays: bool) -> None:
        """The stream broke (and maybe the worker restarted): what was on the wire is
        lost; the follower checks the incarnation and asks to resume."""
        self.link.clear()
        start = self.tracker.resubscribing(self.worker.incarnation)
        if start > 0 and not relay_replays:
            self.tracker.lost_history("OUT_OF_RANGE: no history to resume from")
            start = 0
        if start > 0:
            self.link.extend(self.worker.log[start:])
        # Live from now: the servicer's first heartbeat says where the publisher is.
        self.send(self.worker.heartbeat())

    def caught_up(self) -> bool:
        return not self.link and self.heard == max(self.worker.seq, 0)

    def check(self) -> None:
        if not self.caught_up():
            return
        self.checks += 1
        claimed = set(self.index.export().get(WORKER, (np.array([], np.int64),))[0].tolist())
        held = set(self.worker.cache)
        assert claimed <= held, f"claims blocks the worker dropped: {claimed - held}"
        for prompt in PROMPTS:
            depth = self.index.match(prompt_hashes(prompt, BS, namespace_seed(MODEL)),
                                     [WORKER]).get(WORKER, 0)
            assert depth <= self.worker.cached_depth(prompt), (prompt, depth)


OPS = st.one_of(
    st.tuples(st.just("run"), st.integers(0, len(PROMPTS) - 1)),
    st.tuples(st.sampled_from(["deliver", "drop", "duplicate", "swap", "heartbeat",
                               "clear", "restart"]), st.just(0)),
    st.tuples(st.just("replay"), st.integers(0, 8)),
    st.tuples(st.just("reconnect"), st.booleans()),
)


def play(h: Harness, ops: list[tuple[str, object]]) -> None:
    for op, arg in ops:
        if op == "run":
            h.send(h.worker.run(PROMPTS[int(arg)]))  # type: ignore[call-overload]
        elif op == "deliver":
            h.deliver()
        elif op == "drop" and h.link:
            h.link.pop(0)
        elif op == "duplicate" and h.link:
            h.link.insert(0, h.link[0])
        elif op == "swap" and len(h.link) > 1:
            h.link[0], h.link[1] = h.link[1], h.link[0]
        elif op == "replay" and h.worker.log:
            h.link.insert(0, h.worker.log[max(h.worker.seq - int(arg), 0)])  # type: ignore[call-overload]
        elif op == "heartbeat":
            h.send(h.worker.heartbeat())
        elif op == "clear":
            h.send(h.worker.clear())
        elif op == "restart":
            h.worker.restart()
            h.reconnect(relay_replays=True)
        elif op == "reconnect":
            h.reconnect(relay_replays=bool(arg))


def settle(h: Harness) -> None:
    """The repair window closes: the next heartbeat reaches the router."""
    h.send(h.worker.heartbeat())
    while h.link:
        h.deliver()
    assert h.caught_up()


@settings(max_examples=400, deadline=None)
@given(st.lists(OPS, max_size=60))
def test_random_faults_never_leave_a_false_claim(ops: list[tuple[str, object]]) -> None:
    h = Harness()
    play(h, ops)
    settle(h)
    # And the view heals: what the worker stores from now on is known again.
    fresh = list(range(900, 912))
    h.send(h.worker.run(fresh))
    settle(h)
    assert h.index.match(prompt_hashes(fresh, BS, namespace_seed(MODEL)), [WORKER]) == {
        WORKER: h.worker.cached_depth(fresh)} == {WORKER: 3}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, len(PROMPTS) - 1), max_size=40))
def test_without_faults_the_view_is_exact(runs: list[int]) -> None:
    h = Harness()
    for i in runs:
        h.send(h.worker.run(PROMPTS[i]))
        h.deliver()
        claimed = set(h.index.export().get(WORKER, (np.array([], np.int64),))[0].tolist())
        assert claimed == set(h.worker.cache)
    assert h.tracker.stats.resets == 0


def test_each_fault_is_detected_and_repaired() -> None:
    """One scripted case per fault, with the verdict the tracker reached."""
    h = Harness()
    for p in PROMPTS[:2]:
        h.send(h.worker.run(p))
        h.deliver()
    assert h.tracker.stats.resets == 0
    # Duplicate: skipped, nothing dropped.
    h.link.insert(0, h.worker.log[-1])
    h.deliver()
    assert h.tracker.stats.resets == 0 and h.tracker.stats.skipped == 1
    before = h.index.blocks(WORKER)
    assert before > 0
    # Dropped tail: the next heartbeat tells, the view is dropped.
    h.send(h.worker.run(PROMPTS[3]))
    h.link.pop(0)
    h.send(h.worker.heartbeat())
    h.deliver()
    assert h.tracker.stats.gaps == 1 and h.index.blocks(WORKER) == 0
    # Reordered: the later batch applies after a reset, the earlier is skipped.
    h.send(h.worker.run(PROMPTS[0]))
    h.send(h.worker.run(PROMPTS[4]))
    h.link.reverse()
    h.deliver()
    h.deliver()
    assert h.tracker.stats.resets == 3
    # Replayed old batch: skipped, never re-applied (not even inside the window).
    h.link.insert(0, h.worker.log[0])
    h.deliver()
    assert h.tracker.stats.skipped == 3 and h.index.blocks(WORKER) == 0
    # Restart with a new incarnation: the old view goes at once.
    h.send(h.worker.run(list(range(600, 612))))
    settle(h)
    assert h.index.blocks(WORKER) > 0
    h.worker.restart()
    h.reconnect(relay_replays=True)
    assert h.index.blocks(WORKER) == 0
    settle(h)


def test_cursors_are_per_rank_and_resume_needs_one() -> None:
    seq = SequenceCursors()
    assert seq.admit(0, 5).apply and seq.admit(1, 9).apply
    assert seq.admit(0, 6).apply and seq.admit(1, 10).apply
    assert seq.resume_from() == 0  # two ranks: one start number fits neither
    gap = seq.admit(1, 12)
    assert gap.apply and gap.gap and gap.reset
    back = seq.admit(0, 3)
    assert not back.apply and back.reset and not back.gap
    assert not seq.admit(0, 0, load_only=True).reset  # heartbeat before any batch
    single = SequenceCursors()
    single.admit(0, 7)
    assert single.resume_from() == 8
    chunk = single.admit(0, 40, snapshot_chunk=0)
    assert chunk.apply and chunk.replace and not chunk.reset
