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
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from smg_grpc_proto.generated import common_pb2

from kvmesh.router.cost_model import CostParams
from kvmesh.router.kv_events import FollowerStats, apply_batch
from kvmesh.router.policies import RouteContext, make_policy, pick
from kvmesh.router.prefix_index import PrefixIndex
from kvmesh.router.registry import WorkerRegistry, WorkerState
from kvmesh.routing_workloads import SimRequest

MODEL = "sim-model"
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class SimParams:
    block_size: int = 32
    capacity_blocks: int = 1456  # 46,592 tokens: a 1 GiB CPU KV cache of SmolLM2
    prefill_tokens_per_s: float = 2500.0
    prefill_overhead_s: float = 0.01
    step_base_s: float = 0.012
    step_per_seq_s: float = 0.0015


@dataclass
class _Queued:
    rid: int
    request: SimRequest
    uncached_estimate: int


class SimWorker:
    def __init__(self, worker_id: str, params: SimParams) -> None:
        self.worker_id = worker_id
        self.p = params
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.queue: deque[_Queued] = deque()
        self.prefilling = False
        self.prefilling_uncached = 0
        self.running = 0
        self.seq = 0

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

    def prefill(self, prompt: tuple[int, ...]) -> tuple[int, common_pb2.KvEventBatch]:
        """Run a prefill against the cache; return cached tokens and the KV events."""
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
            evicted = []
            while len(self.cache) > self.p.capacity_blocks:
                evicted.append(self.cache.popitem(last=False)[0])
            if evicted:
                events.append(common_pb2.KvCacheEvent(
                    removed=common_pb2.KvBlocksRemoved(block_hashes=evicted)))
        self.seq += 1
        return hit * bs, common_pb2.KvEventBatch(sequence_number=self.seq, events=events)

    def prefill_seconds(self, uncached: int) -> float:
        return self.p.prefill_overhead_s + uncached / self.p.prefill_tokens_per_s

    def decode_seconds(self, tokens: int) -> float:
        return tokens * (self.p.step_base_s + self.p.step_per_seq_s * self.running)


@dataclass
class PolicyResult:
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    oracle_tokens: int = 0
    output_tokens: int = 0
    first_arrival: float = 0.0
    last_done: float = 0.0

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.ttfts)

        def q(x: float) -> float:
            return ordered[min(len(ordered) - 1, int(x * len(ordered)))]

        return {
            "ttft_p50_s": round(statistics.median(ordered), 4),
            "ttft_p90_s": round(q(0.90), 4),
            "ttft_p99_s": round(q(0.99), 4),
            "throughput_tok_s": round(
                self.output_tokens / max(self.last_done - self.first_arrival, 1e-9), 1),
            "hit_rate": round(self.cached_tokens / max(self.prompt_tokens, 1), 4),
            "oracle_hit_rate": round(self.oracle_tokens / max(self.prompt_tokens, 1), 4),
        }


def simulate(policy_name: str, requests: list[SimRequest], n_workers: int,
             params: SimParams | None = None, seed: int = 0,
             cost: CostParams | None = None) -> dict[str, float]:
    """Run one policy over one workload; return its metrics."""
    p = params or SimParams()
    clock = [0.0]
    registry = WorkerRegistry(lease_ttl_s=1e12, clock=lambda: clock[0])
    index = PrefixIndex(clock=lambda: clock[0])
    policy = make_policy(policy_name, seed, index, cost)
    workers = {f"w{i:03d}": SimWorker(f"w{i:03d}", p) for i in range(n_workers)}
    for wid in workers:
        registry.upsert(WorkerState(worker_id=wid, endpoint=wid, model=MODEL,
                                    block_size=p.block_size,
                                    kv_capacity_tokens=p.capacity_blocks * p.block_size))
    stats = FollowerStats()
    result = PolicyResult(first_arrival=requests[0].arrival_s if requests else 0.0)
    heap: list[tuple[float, int, str, Any]] = []
    counter = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(heap, (t, counter, kind, payload))

    def report(w: SimWorker) -> None:
        # Like the servicer's prefill_pending_tokens: prefill work the engine holds
        # (queued and in progress) that has produced no output yet.
        waiting_uncached = sum(q.uncached_estimate for q in w.queue) + w.prefilling_uncached
        registry.report_load(w.worker_id, w.running, len(w.queue),
                             len(w.cache) / p.capacity_blocks, waiting_uncached)

    def start_prefill(w: SimWorker, now: float) -> None:
        if w.prefilling or not w.queue:
            return
        item = w.queue.popleft()
        cached, batch = w.prefill(item.request.prompt)
        result.cached_tokens += cached
        w.prefilling = True
        w.prefilling_uncached = len(item.request.prompt) - cached
        duration = w.prefill_seconds(w.prefilling_uncached)
        push(now + duration, "prefilled", (w, item, batch))

    for rid, request in enumerate(requests):
        push(request.arrival_s, "arrive", (rid, request))
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        clock[0] = now
        if kind == "arrive":
            rid, request = payload
            ctx = RouteContext(request_id=str(rid), model=MODEL, token_ids=request.prompt,
                               max_tokens=request.output_tokens)
            choice = pick(policy, ctx, registry.candidates(MODEL))
            registry.routed(choice.worker.worker_id, str(rid),
                            len(request.prompt) - choice.expected_cached_tokens)
            hashes = workers["w000"].engine_hashes(request.prompt)  # same scheme everywhere
            result.oracle_tokens += p.block_size * max(
                w.cached_blocks(hashes) for w in workers.values())
            result.prompt_tokens += len(request.prompt)
            w = workers[choice.worker.worker_id]
            uncached = len(request.prompt) - p.block_size * w.cached_blocks(hashes)
            w.queue.append(_Queued(rid, request, uncached))
            start_prefill(w, now)
            report(w)
        elif kind == "prefilled":
            w, item, batch = payload
            apply_batch(index, w.worker_id, MODEL, p.block_size, batch, stats)
            result.ttfts.append(now - item.request.arrival_s)
            w.prefilling = False
            w.prefilling_uncached = 0
            w.running += 1
            push(now + w.decode_seconds(item.request.output_tokens), "done", (w, item))
            start_prefill(w, now)
            report(w)
        else:
            w, item = payload
            w.running -= 1
            registry.finished(w.worker_id, str(item.rid))
            result.output_tokens += item.request.output_tokens
            result.last_done = max(result.last_done, now)
            report(w)
    return result.summary()


def run_all(policies: list[str], workload: list[SimRequest], n_workers: int,
            seed: int = 0, params: SimParams | None = None) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    return {name: simulate(name, workload, n_workers, params, rng.randrange(2**31))
            for name in policies}
