"""Prefill/decode orchestration through the real gateway and router, fake engines.

The fake prefill worker answers a ``do_remote_decode`` request with a NIXL-shaped
hand-over; the fake decode worker reports the prompt's full blocks as loaded when it
gets one. Real KV transfer is covered by tests/e2e/test_pd_nixl.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvmesh.v1 import common_pb2
from tests.router_client import list_workers

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
BLOCK = 32


@pytest.fixture(scope="module")
def pd_mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        # Probed rarely: the fall-back test kills the prefill worker and needs the router
        # to still route to it (a probe would take it out of the set first: no prefill).
        mesh.router = start_router(mesh, "router", "--disaggregation", "always",
                                   yaml="probe_interval_s: 60\n")
        mesh.workers = [
            mesh.start_worker("p0", "--role", "prefill", "--block-size", str(BLOCK)),
            mesh.start_worker("d0", "--role", "decode", "--block-size", str(BLOCK)),
        ]
        mesh.start_gateway()
        yield mesh


def _metric(mesh: Mesh, name: str) -> float:
    text = httpx.get(mesh.http.removesuffix("/v1") + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_workers_register_role_connector_and_side_channel(pd_mesh: Mesh) -> None:
    workers = {s.worker.worker_id: s.worker for s in list_workers(pd_mesh.router)}
    p, d = workers["p0"], workers["d0"]
    assert p.role == common_pb2.WORKER_ROLE_PREFILL
    assert d.role == common_pb2.WORKER_ROLE_DECODE
    assert p.kv_connector == d.kv_connector == "nixl"
    assert p.nixl_side_channel.startswith("127.0.0.1:")
    assert d.nixl_side_channel.startswith("127.0.0.1:")
    assert p.nixl_side_channel != d.nixl_side_channel
    assert pd_mesh.workers[0]["nixl_side_channel"] == p.nixl_side_channel


def test_disaggregated_stream_equals_the_whole_output(pd_mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=pd_mesh.http, api_key="x", max_retries=0)
    before = _metric(pd_mesh, 'kvmesh_gateway_pd_requests_total{mode="disaggregated"}')
    prompt = list(range(300, 300 + 3 * BLOCK + 5))
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                      temperature=0)
    # The fake echoes the prompt: the decode leg produced every token, from the first.
    assert whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens_details.cached_tokens == 3 * BLOCK
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    after = _metric(pd_mesh, 'kvmesh_gateway_pd_requests_total{mode="disaggregated"}')
    assert after - before == 2


def test_prompt_logprobs_prefill_on_the_decode_worker(pd_mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=pd_mesh.http, api_key="x", max_retries=0)
    name = 'kvmesh_gateway_pd_fallbacks_total{reason="prompt_logprobs"}'
    before = _metric(pd_mesh, name)
    prompt = list(range(900, 900 + 2 * BLOCK))
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                      temperature=0, echo=True, logprobs=1)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 3
    assert lp.token_logprobs[0] is None and None not in lp.token_logprobs[1:]
    # No hand-over: the decode worker computed the prompt itself.
    assert not reply.usage.prompt_tokens_details \
        or not reply.usage.prompt_tokens_details.cached_tokens
    assert _metric(pd_mesh, name) - before == 1


def test_prefill_worker_gone_falls_back_to_local_prefill(pd_mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=pd_mesh.http, api_key="x", max_retries=0)
    prompt = list(range(700, 700 + 2 * BLOCK))
    expected = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                         temperature=0).choices[0].text
    before = _metric(pd_mesh, 'kvmesh_gateway_pd_fallbacks_total{reason="prefill_failed"}')
    # Killed hard: no deregistration, so the router still routes to it (lease 3 s).
    proc = pd_mesh.procs.pop("p0")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected
    # Prefilled on the decode worker: nothing was handed over.
    assert not reply.usage.prompt_tokens_details \
        or not reply.usage.prompt_tokens_details.cached_tokens
    after = _metric(pd_mesh, 'kvmesh_gateway_pd_fallbacks_total{reason="prefill_failed"}')
    assert after - before == 1
