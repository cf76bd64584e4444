"""The router deploys without the engine: no torch, vllm, transformers or ray import."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_router_imports_no_engine_stack() -> None:
    code = (
        "import sys, kvmesh.router.server, kvmesh.router.__main__, kvmesh.router.policy.factory\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers', 'ray') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_the_decision_path_imports_no_grpc() -> None:
    """The core, the P/D decision, the cost model, the index and every policy are pure:
    only the servicer and the worker lifecycle talk gRPC."""
    modules = ["kvmesh.router.core", "kvmesh.router.pd", "kvmesh.router.cost_model",
               "kvmesh.router.prefix_index", "kvmesh.router.policy.factory",
               *(f"kvmesh.router.policy.{name}" for name in
                 ("base", "random", "round_robin", "power_of_two", "approx_prefix",
                  "kv_aware"))]
    code = (
        f"import sys, {', '.join(modules)}\n"
        "print(','.join(m for m in ('grpc', 'smg_grpc_proto') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == ""
