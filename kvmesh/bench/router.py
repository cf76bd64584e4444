"""`kvmesh bench router`: the router core's own costs, next to Ray Serve's prefix tree.

- KV-event ingestion: BlockStored events (64 blocks each) applied to the index.
- Memory per indexed block: RSS growth of this process over the fill.
- Decision latency of the kv_aware policy for 1k/4k/8k-token prompts over the filled
  index and 16 workers (half the prompts share a cached prefix).
- The same match on Ray Serve LLM's PrefixTree (from the installed ``ray`` package),
  built from the same trace as text (4 characters a token, as Ray routes on text),
  at a size its pure-Python tree can hold; kvmesh's index is measured at that same
  size too, so the ratio compares like with like.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import random
import statistics
import time
from typing import Any

import numpy as np
import psutil

from kvmesh.core.service_main import freeze_heap
from kvmesh.router import kernels
from kvmesh.router.block_hash import namespace_seed, prompt_hash_array
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.policy.kv_aware import KvAwarePolicy
from kvmesh.router.prefix_index import PrefixIndex, StoredBlocks
from kvmesh.router.registry import WorkerState

BS = 32
MODEL = "bench"
WORKERS = [f"w{i:02d}" for i in range(16)]


def _rss() -> int:
    """Resident memory after a collection, with freed heap handed back to the OS (so
    the fill's temporaries don't count as the index's)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: no trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def chains_of(blocks: int, seed: int, chain_blocks: int = 256) -> list[np.ndarray]:
    """The trace: token chains of ``chain_blocks`` blocks (compact numpy arrays)."""
    gen = np.random.default_rng(seed)
    sizes = [chain_blocks] * (blocks // chain_blocks)
    if blocks % chain_blocks:
        sizes.append(blocks % chain_blocks)
    return [gen.integers(0, 49_000, n * BS, dtype=np.uint32) for n in sizes]


def fill(index: PrefixIndex, chains: list[np.ndarray],
          workers: list[str] | None = None) -> float:
    """Store every chain as BlockStored events of 64 blocks, the chains dealt over
    ``workers`` in turn (default the 16 of this benchmark); return seconds spent."""
    holders = workers or WORKERS
    engine = 1
    elapsed = 0.0
    for c, tokens in enumerate(chains):
        n = len(tokens) // BS
        worker = holders[c % len(holders)]
        parent = None
        for start in range(0, n, 64):
            count = min(64, n - start)
            hashes = list(range(engine, engine + count))
            event = StoredBlocks(hashes, tokens[start * BS:(start + count) * BS], BS, parent,
                                 model=MODEL)
            t0 = time.perf_counter()
            index.stored(worker, event)
            elapsed += time.perf_counter() - t0
            parent = hashes[-1]
            engine += count
    return elapsed


INDEX_SIZES = (10_000, 100_000)


def _filled(blocks: int, seed: int) -> tuple[PrefixIndex, list[np.ndarray]]:
    """A fresh index holding ``blocks`` blocks of a seeded trace, and that trace."""
    chains = chains_of(blocks, seed)
    index = PrefixIndex()
    fill(index, chains)
    return index, chains


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_us": round(statistics.median(ordered) * 1e6, 1),
            "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e6, 1)}


def prompt_of(chains: list[np.ndarray], prompt_tokens: int, i: int,
            rng: random.Random) -> np.ndarray:
    """Even i: a cached chain (repeated to length); odd i: fresh tokens. One uint32
    buffer, as the router's servicer holds a request (np.frombuffer of the packed ids)."""
    if i % 2 == 0:
        return np.resize(rng.choice(chains), prompt_tokens)
    fresh = np.random.default_rng(rng.getrandbits(64))
    return fresh.integers(0, 49_000, prompt_tokens, dtype=np.uint32)


def _decisions(index: PrefixIndex, chains: list[np.ndarray], prompt_tokens: int,
               rng: random.Random, n: int = 1000) -> dict[str, float]:
    policy = KvAwarePolicy(index, rng)
    workers = [WorkerState(worker_id=w, endpoint=w, model=MODEL, block_size=BS)
               for w in WORKERS]
    samples = []
    for i in range(n):
        prompt = prompt_of(chains, prompt_tokens, i, rng)
        ctx = RouteContext(request_id=str(i), model=MODEL, token_ids=prompt)
        t0 = time.perf_counter()
        policy.choose(ctx, workers)
        samples.append(time.perf_counter() - t0)
    return _percentiles(samples)


def _ray_tree_match(chains: list[np.ndarray], prompt_tokens: int, rng: random.Random,
                    n: int = 200) -> dict[str, Any]:
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 4096)]
    table = ["".join(rng.choice(alphabet) for _ in range(4)) for _ in range(49_000)]

    def text(tokens: list[int]) -> str:
        return "".join(table[t] for t in tokens)

    tree = PrefixTree()
    tree.add_tenants(WORKERS, 0)
    t0 = time.perf_counter()
    for i, chain in enumerate(chains):
        tree.insert(text(chain.tolist()), WORKERS[i % len(WORKERS)], float(i))
    insert_s = time.perf_counter() - t0
    samples = []
    for i in range(n):
        query = text(prompt_of(chains, prompt_tokens, i, rng).tolist())
        t0 = time.perf_counter()
        tree.prefix_match(query, WORKERS)
        samples.append(time.perf_counter() - t0)
    blocks = sum(len(c) for c in chains) // BS
    return {**_percentiles(samples),
            "insert_blocks_per_s": round(blocks / insert_s)}


def run_router_bench(blocks: int = 1_000_000, ray_blocks: int = 20_000,
                     seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    chains = chains_of(blocks, seed)
    kernels.warm_up()  # the compiled code's own memory is not the index's
    before = _rss()
    index = PrefixIndex()
    ingest_s = fill(index, chains)
    after = _rss()
    freeze_heap()  # as the router service does once started (index restored)
    report: dict[str, Any] = {
        "indexed_blocks": len(index),
        "ingest_blocks_per_s": round(blocks / ingest_s),
        "bytes_per_block": round((after - before) / blocks, 1),
        "index_bytes_per_block": round(index.nbytes() / blocks, 1),
        "decision_latency": {
            f"{n}_tokens": _decisions(index, chains, n, rng) for n in (1024, 4096, 8192)
        },
    }
    # Decision cost against index size (8k-token prompts): the largest is the one above.
    by_size = {str(n): _decisions(*_filled(n, seed + 3 + i), 8192, rng, n=300)
               for i, n in enumerate(INDEX_SIZES) if n < blocks}
    by_size[str(blocks)] = report["decision_latency"]["8192_tokens"]
    report["decision_latency_8k_by_indexed_blocks"] = by_size
    small, small_chains = _filled(ray_blocks, seed + 1)
    ours = _decisions(small, small_chains, 8192, rng, n=200)
    ray = _ray_tree_match(small_chains, 8192, random.Random(seed + 2))
    report["vs_ray_prefix_tree"] = {
        "indexed_blocks": ray_blocks,
        "prompt_tokens": 8192,
        "kvmesh_kv_aware_decision": ours,
        "ray_prefix_match": ray,
        "kvmesh_p99_over_ray_p99": round(ours["p99_us"] / ray["p99_us"], 3),
    }
    report["hash_8k_prompt_us"] = round(_time_hash(rng) * 1e6, 1)
    return report


def _time_hash(rng: random.Random) -> float:
    # As the servicer holds a request's prompt: np.frombuffer of the packed bytes.
    tokens = np.array([rng.randrange(49_000) for _ in range(8192)], dtype=np.uint32)
    seed = namespace_seed(MODEL)
    t0 = time.perf_counter()
    for _ in range(200):
        prompt_hash_array(tokens, BS, seed)
    return (time.perf_counter() - t0) / 200
