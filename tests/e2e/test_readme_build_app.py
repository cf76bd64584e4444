"""The README's `kvmesh.build_app` example runs as written (real vLLM on CPU): a mesh
from a Python mapping, a chat answer through it, a model added while it runs, and
everything stopped at the end of the `with` block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    start = text.index("**From Python**")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, "the README lost its build_app example"
    return match.group(1)


def test_the_readme_build_app_example_runs(tmp_path: Path, model_dir: Path) -> None:
    script = tmp_path / "example.py"
    # The example's own code, plus a check of what it leaves behind once the block ends.
    script.write_text(readme_example() + (
        "import ray\n"
        "print('models:', [p.model_id for p in app.models()], 'ray up:', ray.is_initialized())\n"))
    # Free ports instead of 8000 on a shared machine (the env fills what the mapping omits).
    env = {**os.environ, "KVMESH_GATEWAY__PORT": "0"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=900, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "Paris" in out.stdout
    assert "models: [] ray up: False" in out.stdout  # stopped: pools gone, Ray down
