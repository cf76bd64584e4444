"""Route p99 at 5,000/s, 256 workers, by prompt length (run as: python prompt_length.py N).

The same run as `kvmesh bench router --rpc --blocks 1000000 --workers 256 --transports
stream --rate 5000 --rounds 1`, with `prompt_tokens` (fixed at 8192 on the command line)
as the argument.
"""

import sys

from kvmesh.bench.router_rpc import run_router_rpc_bench

tokens = int(sys.argv[1])
report = run_router_rpc_bench(blocks=1_000_000, fleets=(256,), rate=5000,
                              prompt_tokens=tokens, transports=("stream",), rounds=1)
for fleet in report["fleets"]:
    for run in fleet["runs"]:
        fixed, closed = run["at_fixed_rate"], run["saturated"]
        print(tokens, "closed", closed["decisions_per_s"], "cpu",
              closed["decisions_per_router_cpu_s"], "p50", fixed["p50_ms"], "p99",
              fixed["p99_ms"], "busy", fixed["router_busy"], "batch", fixed["mean_batch"])
