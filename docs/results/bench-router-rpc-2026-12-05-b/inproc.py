"""In-process cost of RouterServicer._batch at N workers, 1M blocks (ad hoc).

python docs/results/bench-router-rpc-2026-12-05-b/inproc.py 256 [prof]
"""

import asyncio
import cProfile
import gc
import os
import pstats
import random
import sys
import time

from kvmesh.bench.router import BS, chains_of, fill, prompt_of
from kvmesh.core.config import RouterConfig
from kvmesh.router import kernels
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import router_pb2

N = int(sys.argv[1])
MODEL = "bench"
PROF = len(sys.argv) > 2
BATCH = 4

kernels.warm_up()
core = RouterCore(RouterConfig(metrics_port=None, seed=0))
ids = [f"w{i:03d}" for i in range(N)]
for w in ids:
    core.registry.upsert(WorkerState(worker_id=w, endpoint=w, model=MODEL, block_size=BS,
                                     kv_capacity_tokens=1 << 20, self_registered=False))
chains = chains_of(1_000_000, 1)
fill(core.index, chains, ids)
servicer = RouterServicer(core, WorkerLifecycle(core))
rng = random.Random(2)
prompts = [prompt_of(chains, 8192, i, rng) for i in range(512)]
reqs = [router_pb2.RouteRequest(request_id=f"r{i}", model=MODEL, max_tokens=16,
                                packed_token_ids=prompts[i % 512].tobytes())
        for i in range(20000)]
batches = [router_pb2.RouteBatchRequest.FromString(
    router_pb2.RouteBatchRequest(requests=reqs[i:i + BATCH]).SerializeToString())
    for i in range(0, len(reqs), BATCH)]
gc.collect()
gc.freeze()


async def run() -> float:
    finished: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for b in batches:
        for w, r in finished:
            core.finish(w, r)
        ans = await servicer._batch(b.requests, None, True)
        finished = [(res.decision.worker.worker_id, req.request_id)
                    for res, req in zip(ans.results, b.requests, strict=True)]
    return time.perf_counter() - t0


loop = asyncio.new_event_loop()
loop.run_until_complete(run())  # warm
profile = cProfile.Profile() if PROF else None
if profile is not None:
    profile.enable()
elapsed = min(loop.run_until_complete(run()) for _ in range(int(os.environ.get("REPS", "3"))))
if profile is not None:
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)
print(f"{N} workers: {elapsed / len(reqs) * 1e6:.1f} us per decision "
      f"(batches of {BATCH}, finishes incl.)")
