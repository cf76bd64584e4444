"""glibc's allocator with fixed thresholds: a freed buffer of a few MiB is reused
without new page faults (glibc's default maps the first one fresh and the second one
from new heap pages), in a process of its own so no earlier allocation decides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROBE = """
import json, resource
from kvmesh.core.malloc_tuning import tune_malloc
tuned = tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = []
for _ in range(4):
    before = faults()
    buffer = b"x" * (16 << 20)  # written through: every page it gets is touched
    out.append(faults() - before)
    del buffer
print(json.dumps({"tuned": tuned, "faults": out}))
"""

PAGES = (16 << 20) // 4096


def probe(setting: str) -> dict[str, object]:
    env = {**os.environ, "KVMESH_MALLOC_TUNING": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_buffer_is_reused_without_page_faults() -> None:
    tuned, default = probe("1"), probe("0")
    assert tuned["tuned"] is True and default["tuned"] is False
    tuned_faults, default_faults = tuned["faults"], default["faults"]
    assert isinstance(tuned_faults, list) and isinstance(default_faults, list)
    # The first buffer is new memory either way.
    assert tuned_faults[0] > PAGES // 2 and default_faults[0] > PAGES // 2
    # glibc's default: mapped, unmapped on free, then served from fresh heap pages.
    assert default_faults[1] > PAGES // 2
    # Fixed thresholds: the freed heap is kept and reused.
    assert sum(tuned_faults[1:]) < PAGES // 16
