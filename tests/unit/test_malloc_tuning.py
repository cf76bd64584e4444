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


def test_the_opt_out_reaches_a_worker_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray actor may run on a cluster the launcher did not start (its own
    environment): the setting goes with the actor's runtime_env."""
    import ray

    from kvmesh.core.config import WorkerConfig
    from kvmesh.worker.actor import spawn_worker_actor

    seen: list[dict[str, object]] = []

    class Remote:
        def options(self, **options: object) -> Remote:
            seen.append(options)
            return self

        def remote(self, *args: object) -> None:
            return None

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    monkeypatch.setenv("KVMESH_MALLOC_TUNING", "0")
    spawn_worker_actor(WorkerConfig())
    monkeypatch.delenv("KVMESH_MALLOC_TUNING")
    spawn_worker_actor(WorkerConfig())
    envs = [o["runtime_env"]["env_vars"] for o in seen]  # type: ignore[index]
    assert envs[0]["KVMESH_MALLOC_TUNING"] == "0"
    assert "KVMESH_MALLOC_TUNING" not in envs[1]
