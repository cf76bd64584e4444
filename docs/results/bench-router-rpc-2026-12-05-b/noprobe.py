"""`kvmesh bench router ...` with the router's probe_interval_s set (ad hoc).

python docs/results/bench-router-rpc-2026-12-05-b/noprobe.py SECONDS bench router --rpc ...
"""

import functools
import sys

import kvmesh.bench.router_rpc as router_rpc
from kvmesh.cli import main
from kvmesh.core.config import RouterConfig

router_rpc.RouterConfig = functools.partial(  # type: ignore[misc]
    RouterConfig, probe_interval_s=float(sys.argv[1]))
sys.exit(main(sys.argv[2:]))
