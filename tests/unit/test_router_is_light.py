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
