import functools, sys
import kvmesh.bench.router_rpc as rr
from kvmesh.core.config import RouterConfig
rr.RouterConfig = functools.partial(RouterConfig, probe_interval_s=float(sys.argv[1]))
sys.argv = ["kvmesh", *sys.argv[2:]]
from kvmesh.cli import main
sys.exit(main())
