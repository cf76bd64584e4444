"""In-process cost of RouterServicer._batch at N workers, 1M blocks (ad hoc)."""
import asyncio, gc, random, sys, time, cProfile, pstats
import numpy as np
from kvmesh.bench.router import BS, chains_of, fill, prompt_of
from kvmesh.core.config import RouterConfig
from kvmesh.router import kernels
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import router_pb2

N = int(sys.argv[1]); MODEL = "bench"; PROF = len(sys.argv) > 2
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
        packed_token_ids=prompts[i % 512].tobytes()) for i in range(20000)]
B = 4
batches = []
for i in range(0, len(reqs), B):
    b = router_pb2.RouteBatchRequest(requests=reqs[i:i+B])
    batches.append(router_pb2.RouteBatchRequest.FromString(b.SerializeToString()))
gc.collect(); gc.freeze()
async def run():
    finished = []
    t0 = time.perf_counter()
    for b in batches:
        for w, r in finished: core.finish(w, r)
        ans = await servicer._batch(b.requests, None, True)
        finished = [(res.decision.worker.worker_id, req.request_id) for res, req in zip(ans.results, b.requests)]
    return time.perf_counter() - t0
loop = asyncio.new_event_loop()
loop.run_until_complete(run())  # warm
if PROF:
    pr = cProfile.Profile(); pr.enable()
el = min(loop.run_until_complete(run()) for _ in range(int(__import__("os").environ.get("REPS","3"))))
if PROF:
    pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(30)
print(f"{N} workers: {el/len(reqs)*1e6:.1f} us per decision (batches of {B}, finishes incl.)")
