"""Router admission: with one request in flight per worker, the next waits at the
router (and is refused with 429 + Retry-After when no slot frees in time)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        limits = mesh.dir / "admission.yaml"
        limits.write_text("policy: kv_aware\nmax_inflight_per_worker: 1\n"
                          "admission_max_wait_s: 3\nmetrics_port: 0\n")
        mesh.router = start_router(mesh, "router", "--config", str(limits))
        mesh.workers = [mesh.start_worker("w0")]
        mesh.start_gateway()
        yield mesh


def _stream(mesh: Mesh, max_tokens: int, marks: dict[str, float], name: str) -> None:
    client = openai.OpenAI(base_url=mesh.http, api_key="x", max_retries=0)
    # The fake engine echoes the prompt, a token per 20 ms: the prompt is long enough.
    stream = client.completions.create(model=MODEL, prompt=f"{name} " * (max_tokens + 5),
                                       max_tokens=max_tokens, stream=True)
    for chunk in stream:
        marks[f"{name}.tokens"] = marks.get(f"{name}.tokens", 0) + 1
        if chunk.choices and chunk.choices[0].text and f"{name}.first" not in marks:
            marks[f"{name}.first"] = time.monotonic()
    marks[f"{name}.done"] = time.monotonic()


def _admission_waits(mesh: Mesh) -> float:
    text = httpx.get(f"http://{mesh.router_metrics}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("kvmesh_router_admission_wait_seconds_count"))


def test_the_second_request_waits_for_the_first_to_finish(mesh: Mesh) -> None:
    marks: dict[str, float] = {}
    waits_before = _admission_waits(mesh)
    first = threading.Thread(target=_stream, args=(mesh, 40, marks, "a"))  # ~0.8 s
    first.start()
    while "a.first" not in marks:
        time.sleep(0.01)
    second = threading.Thread(target=_stream, args=(mesh, 5, marks, "b"))
    second.start()
    first.join(30)
    second.join(30)
    # One slot: b's first token only after a finished, although b is the shorter one.
    assert marks["a.tokens"] >= 40 and marks["a.done"] - marks["a.first"] > 0.5
    assert marks["b.first"] >= marks["a.done"]
    assert _admission_waits(mesh) >= waits_before + 2


def test_no_free_slot_in_time_is_a_429_with_retry_after(mesh: Mesh) -> None:
    marks: dict[str, float] = {}
    long = threading.Thread(target=_stream, args=(mesh, 300, marks, "long"))  # ~6 s
    long.start()
    while "long.first" not in marks:
        time.sleep(0.01)
    refused = httpx.post(mesh.http + "/completions", timeout=30, json={
        "model": MODEL, "prompt": "no room", "max_tokens": 2})
    still_streaming = "long.done" not in marks
    long.join(30)
    assert still_streaming
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "in flight" in refused.json()["error"]["message"]
    # The slot is free again: the next request goes straight through.
    again = httpx.post(mesh.http + "/completions", timeout=30, json={
        "model": MODEL, "prompt": "room now", "max_tokens": 2})
    assert again.status_code == 200
