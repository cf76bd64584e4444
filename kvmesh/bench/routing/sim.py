"""Simulated workers for routing benchmarks: real LRU block caches, a prefill/decode
time model, and real KV events fed through the router's own code path.

Each simulated worker keeps an LRU cache of KV blocks keyed by its own engine-style
hashes and, whenever it stores or evicts blocks, emits ``KvEventBatch`` protobufs
exactly like the VllmEngine servicer; the router side applies them with
``kv_events.apply_batch`` into the real ``PrefixIndex`` and routes with the real
policies over a real ``WorkerRegistry``. So 16–256 workers fit on one machine and the
results carry over to the live router.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from smg_grpc_proto.generated import common_pb2

from kvmesh.bench.routing.misses import MissAnalysis
from kvmesh.bench.routing.sim_stats import PolicyResult, best_prefix
from kvmesh.bench.routing.workloads import SimRequest
from kvmesh.core.config import CostParams
from kvmesh.router.kv_events import FollowerStats, apply_batch
from kvmesh.router.policy.base import RouteContext, pick
from kvmesh.router.policy.factory import make_policy
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.registry import WorkerRegistry, WorkerState

MODEL = "sim-model"
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class SimParams:
    """A vLLM-like engine step: every running sequence decodes one token and the rest
    of the token budget prefills waiting prompts (chunked prefill), so decode load
    slows prefill and the other way round. Defaults match SmolLM2-135M on 2 CPU cores
    (~85 tok/s single stream, ~500 tok/s at 32 sequences, ~2500 prefill tok/s)."""

    block_size: int = 32
    capacity_blocks: int = 1456  # 46,592 tokens: a 1 GiB CPU KV cache of SmolLM2
    step_base_s: float = 0.010
    decode_s_per_seq: float = 0.0015
    prefill_s_per_token: float = 0.0004
    max_batched_tokens: int = 512
    max_running: int = 128


#: A GPU-class engine per worker (~100k prefill tokens/s, 4 ms step, 0.1 ms per running
#: sequence, 8k-token steps, 4096 blocks of KV), so a 256-worker fleet serves 10,000
#: requests/s of the benchmark workloads: the load the router must keep up with there.
FLEET = SimParams(capacity_blocks=4096, step_base_s=0.004, decode_s_per_seq=0.0001,
                  prefill_s_per_token=0.00001, max_batched_tokens=8192, max_running=256)
PRESETS = {"cpu": SimParams(), "fleet": FLEET}


@dataclass
class _Queued:
    rid: int
    request: SimRequest
    uncached_estimate: int
    remaining: int = -1  # prefill tokens still to compute once scheduled
    cached: int = 0


@dataclass
class _Running:
    rid: int
    request: SimRequest
    left: int


class SimWorker:
    def __init__(self, worker_id: str, params: SimParams,
                 holders: dict[int, set[str]] | None = None,
                 on_schedule: Callable[[_Queued], None] | None = None) -> None:
        self.worker_id = worker_id
        self.on_schedule = on_schedule  # a request's prefill starts (the miss analysis)
        self.p = params
        #: The fleet's block hash → workers holding it (shared, for the oracle).
        self.holders: dict[int, set[str]] = {} if holders is None else holders
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.queue: deque[_Queued] = deque()
        self.running: list[_Running] = []
        self.stepping = False
        self.seq = 0
        self.pending = 0

    def engine_hashes(self, prompt: tuple[int, ...]) -> list[int]:
        bs = self.p.block_size
        out, parent = [], 0x5EED
        for i in range(len(prompt) // bs):
            parent = hash((parent, prompt[i * bs:(i + 1) * bs])) & _MASK
            out.append(parent)
        return out

    def cached_blocks(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        return n

    def lookup(self, prompt: tuple[int, ...]) -> int:
        """Cached prompt tokens when a request is scheduled (touches the blocks)."""
        hashes = self.engine_hashes(prompt)
        hit = self.cached_blocks(hashes)
        for h in hashes[:hit]:
            self.cache.move_to_end(h)
        return hit * self.p.block_size

    def prefill(self, prompt: tuple[int, ...]) -> tuple[int, common_pb2.KvEventBatch]:
        """Store a computed prompt's blocks; return cached tokens and the KV events."""
        bs = self.p.block_size
        hashes = self.engine_hashes(prompt)
        hit = self.cached_blocks(hashes)
        for h in hashes[:hit]:
            self.cache.move_to_end(h)
        events = []
        new = hashes[hit:]
        if new:
            stored = common_pb2.KvBlocksStored(blocks=[
                common_pb2.KvBlock(block_hash=h, block_size=bs,
                                   token_ids=prompt[(hit + i) * bs:(hit + i + 1) * bs])
                for i, h in enumerate(new)
            ])
            if hit:
                stored.parent_block_hash = hashes[hit - 1]
            events.append(common_pb2.KvCacheEvent(stored=stored))
            for h in new:
                self.cache[h] = None
                self.holders.setdefault(h, set()).add(self.worker_id)
            evicted = []
            while len(self.cache) > self.p.capacity_blocks:
                gone = self.cache.popitem(last=False)[0]
                evicted.append(gone)
                held = self.holders.get(gone)
                if held is not None:
                    held.discard(self.worker_id)
                    if not held:
                        del self.holders[gone]
            if evicted:
                events.append(common_pb2.KvCacheEvent(
                    removed=common_pb2.KvBlocksRemoved(block_hashes=evicted)))
        self.seq += 1
        return hit * bs, common_pb2.KvEventBatch(sequence_number=self.seq, events=events)

    def enqueue(self, item: _Queued) -> None:
        self.queue.append(item)
        self.pending += item.uncached_estimate

    def blocks_in_use(self) -> int:
        """KV blocks the running sequences hold (prompt and answer so far)."""
        return sum(-(-(len(s.request.prompt) + s.request.output_tokens - s.left)
                     // self.p.block_size) for s in self.running)

    def pending_prefill_tokens(self) -> int:
        """Prefill tokens queued (estimates until scheduled), kept as a running sum:
        an overloaded worker's queue holds thousands."""
        return self.pending

    def plan_step(self) -> tuple[float, list[_Queued]]:
        """Schedule one engine step; return its duration and the prompts it finishes."""
        budget = self.p.max_batched_tokens - len(self.running)
        prefilled = 0
        finished: list[_Queued] = []
        for item in self.queue:
            if budget <= 0 or len(self.running) + len(finished) >= self.p.max_running:
                break
            if item.remaining < 0:
                item.cached = min(self.lookup(item.request.prompt),
                                  len(item.request.prompt) - 1)
                item.remaining = len(item.request.prompt) - item.cached
                self.pending += item.remaining - item.uncached_estimate
                if self.on_schedule is not None:
                    self.on_schedule(item)
            take = min(budget, item.remaining)
            item.remaining -= take
            self.pending -= take
            budget -= take
            prefilled += take
            if item.remaining == 0:
                finished.append(item)
        for item in finished:
            self.queue.remove(item)
        duration = (self.p.step_base_s + self.p.decode_s_per_seq * len(self.running)
                    + self.p.prefill_s_per_token * prefilled)
        return duration, finished


@dataclass
class _Replica:
    """One router replica: its own registry, index and policy."""

    registry: WorkerRegistry
    index: PrefixIndex
    policy: Any
    stats: FollowerStats = field(default_factory=FollowerStats)


def simulate(policy_name: str, requests: list[SimRequest], n_workers: int,
             params: SimParams | None = None, seed: int = 0,
             cost: CostParams | None = None, replicas: int = 1,
             shared_view: bool = False, analysis: MissAnalysis | None = None,
             concurrency: int = 0) -> dict[str, float]:
    """Run one policy over one workload; return its metrics.

    With ``replicas`` > 1 (kv_aware), that many router replicas each get every worker's
    KV events and load reports; requests take turns among them, and each finished
    report goes to the replica that routed it. At every arrival each other replica's
    choice for the same request is computed too (without booking it), giving
    ``agreement``: the share of (request, replica) pairs that chose the deciding
    replica's worker. ``shared_view`` also tells every replica of every booking, so
    their views are the same (the determinism check: agreement 1.0). ``analysis``
    (kv_aware) is told every decision and what each worker really held. With
    ``concurrency`` > 0 the run is a closed loop, as ``vllm bench serve
    --max-concurrency`` drives a server: that many requests are out at once, the next
    sent as one finishes (arrival times ignored; TTFT counts from the send)."""
    p = params or SimParams()
    clock = [0.0]
    if replicas > 1 and policy_name != "kv_aware":
        raise ValueError("replica agreement is measured for kv_aware")
    routers = []
    for _ in range(replicas):
        index = PrefixIndex(clock=lambda: clock[0])
        routers.append(_Replica(WorkerRegistry(lease_ttl_s=1e12, clock=lambda: clock[0]),
                                index, make_policy(policy_name, seed, index, cost)))
    holders: dict[int, set[str]] = {}
    ids = [f"w{i:03d}" for i in range(n_workers)]

    def truth(prompt: tuple[int, ...]) -> list[int]:
        hashes = workers[ids[0]].engine_hashes(prompt)
        return [p.block_size * workers[w].cached_blocks(hashes) for w in ids]

    def schedule(item: _Queued) -> None:
        assert analysis is not None
        analysis.scheduled(str(item.rid), item.cached, truth(item.request.prompt))
    workers = {w: SimWorker(w, p, holders, schedule if analysis else None) for w in ids}
    for wid in workers:
        for r in routers:
            r.registry.upsert(WorkerState(worker_id=wid, endpoint=wid, model=MODEL,
                                          block_size=p.block_size,
                                          kv_capacity_tokens=p.capacity_blocks * p.block_size))
    result = PolicyResult(first_arrival=requests[0].arrival_s if requests else 0.0)
    heap: list[tuple[float, int, str, Any]] = []
    counter = 0
    owner: dict[str, list[_Replica]] = {}
    agree = compared = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(heap, (t, counter, kind, payload))

    def report(w: SimWorker) -> None:
        # Like the servicer: running/waiting counts, KV usage as vLLM reports it (blocks
        # running requests use; cached blocks nobody uses count as free), and the
        # prefill work the engine holds that has produced no output yet.
        for r in routers:
            r.registry.report_load(w.worker_id, len(w.running), len(w.queue),
                                   w.blocks_in_use() / p.capacity_blocks,
                                   w.pending_prefill_tokens())

    def step(w: SimWorker, now: float) -> None:
        if w.stepping or not (w.queue or w.running):
            return
        duration, finished = w.plan_step()
        w.stepping = True
        push(now + duration, "step", (w, finished))

    unsent = deque(enumerate(requests))
    start = requests[0].arrival_s if requests else 0.0
    while unsent and (not concurrency or len(unsent) > len(requests) - concurrency):
        rid, request = unsent.popleft()
        push(start if concurrency else request.arrival_s, "arrive",
             (rid, replace(request, arrival_s=start) if concurrency else request))

    def finish(worker_id: str, rid: str) -> None:
        for r in owner.pop(rid):
            r.registry.finished(worker_id, rid)
            r.policy.finished(rid)
        if concurrency and unsent:  # closed loop: the next request goes out now
            nid, request = unsent.popleft()
            push(clock[0], "arrive", (nid, replace(request, arrival_s=clock[0])))

    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        clock[0] = now
        if kind == "arrive":
            rid, request = payload
            ctx = RouteContext(request_id=str(rid), model=MODEL, token_ids=request.prompt,
                               max_tokens=request.output_tokens)
            deciding = routers[rid % replicas]
            others = [r for r in routers if r is not deciding]
            peeks = [r.policy.decide(ctx, r.registry.candidates(MODEL))[0].worker.worker_id
                     for r in others]
            choice = pick(deciding.policy, ctx, deciding.registry.candidates(MODEL))
            wid = choice.worker.worker_id
            if analysis is not None:
                ev = deciding.policy.last
                confirmed = deciding.index.match(ev.hashes_by_size[p.block_size], ids, False)
                analysis.decided(str(rid), ev, len(request.prompt), truth(request.prompt),
                                 [p.block_size * confirmed[w] for w in ids])
            agree += sum(1 for x in peeks if x == wid)
            compared += len(peeks)
            booked = [deciding]
            if shared_view:
                for r in others:
                    r.policy.book(ctx, r.registry.get(wid))
                booked = routers
            for r in booked:
                r.registry.routed(wid, str(rid),
                                  len(request.prompt) - choice.expected_cached_tokens)
            owner[str(rid)] = booked
            hashes = workers["w000"].engine_hashes(request.prompt)  # same scheme everywhere
            result.oracle_tokens += p.block_size * best_prefix(holders, hashes)
            result.prompt_tokens += len(request.prompt)
            w = workers[wid]
            uncached = len(request.prompt) - p.block_size * w.cached_blocks(hashes)
            w.enqueue(_Queued(rid, request, uncached))
            step(w, now)
            report(w)
        else:
            w, finished = payload
            w.stepping = False
            still: list[_Running] = []
            for seq in w.running:
                seq.left -= 1
                if seq.left > 0:
                    still.append(seq)
                else:
                    finish(w.worker_id, str(seq.rid))
                    result.output_tokens += seq.request.output_tokens
                    result.last_done = max(result.last_done, now)
            w.running = still
            for item in finished:
                _, batch = w.prefill(item.request.prompt)
                for r in routers:
                    apply_batch(r.index, w.worker_id, MODEL, p.block_size, batch, r.stats)
                result.cached_tokens += item.cached
                result.ttfts.append(now - item.request.arrival_s)
                # The step that finished the prompt produced its first token.
                if item.request.output_tokens > 1:
                    w.running.append(
                        _Running(item.rid, item.request, item.request.output_tokens - 1))
                else:
                    finish(w.worker_id, str(item.rid))
                    result.output_tokens += item.request.output_tokens
                    result.last_done = max(result.last_done, now)
            step(w, now)
            report(w)
    summary = result.summary()
    if compared:
        summary["agreement"] = round(agree / compared, 4)
    return summary


def run_all(policies: list[str], workload: list[SimRequest], n_workers: int,
            seed: int = 0, params: SimParams | None = None,
            replicas: int = 1, concurrency: int = 0, misses: bool = False
            ) -> dict[str, dict[str, Any]]:
    """Each policy over the workload; with ``replicas`` > 1 also kv_aware behind that
    many router replicas (own bookings, then the same view), with their agreement;
    with ``misses``, kv_aware's avoidable misses by rule (``misses.py``)."""
    rng = random.Random(seed)
    results: dict[str, dict[str, Any]] = {}
    for name in policies:
        started = time.perf_counter()
        analysis = (MissAnalysis(CostParams(), (params or SimParams()).block_size)
                    if misses and name == "kv_aware" else None)
        results[name] = simulate(name, workload, n_workers, params, rng.randrange(2**31),
                                 analysis=analysis, concurrency=concurrency)
        results[name]["sim_wall_s"] = round(time.perf_counter() - started, 1)
        if analysis is not None:
            results[name]["misses"] = analysis.summary()
    if replicas > 1:
        for shared, label in ((False, ""), (True, ", same view")):
            started = time.perf_counter()
            key = f"kv_aware x{replicas} replicas{label}"
            results[key] = simulate("kv_aware", workload, n_workers, params, seed,
                                    replicas=replicas, shared_view=shared)
            results[key]["sim_wall_s"] = round(time.perf_counter() - started, 1)
    return results
