"""Prefill/decode orchestration through the real gateway and router, fake engines.

The fake prefill worker answers a ``do_remote_decode`` request with a NIXL-shaped
hand-over; the fake decode worker reports the prompt's full blocks as loaded when it
gets one. Real KV transfer is covered by tests/e2e/test_pd_nixl.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvmesh.v1 import common_pb2
from tests.failover_streams import seconds_until_unreachable
from tests.router_client import list_workers

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
BLOCK = 32
PREFILL_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def pd_mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        # Probed rarely: the fall-back test stops the prefill worker and needs the router
        # to still route to it (a probe would take it out of the set first: no prefill).
        mesh.router = start_router(mesh, "router", "--disaggregation", "always",
                                   yaml="probe_interval_s: 60\n")
        mesh.workers = [
            mesh.start_worker("p0", "--role", "prefill", "--block-size", str(BLOCK)),
            mesh.start_worker("d0", "--role", "decode", "--block-size", str(BLOCK)),
        ]
        mesh.start_gateway(env={**os.environ,
                                "KVMESH_GATEWAY_PREFILL_TIMEOUT_S": str(PREFILL_TIMEOUT_S)})
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


def test_prefill_worker_hung_then_gone_falls_back_to_local_prefill(pd_mesh: Mesh) -> None:
    """A prefill worker that stops answering (SIGSTOP: its connections stay open, so
    the router still routes to it) costs the request the prefill deadline, then the
    decode worker prefills locally. Once it is gone (SIGKILL) its event stream breaks,
    the router probes it at once and routes around it: no prefill leg is tried."""
    client = openai.OpenAI(base_url=pd_mesh.http, api_key="x", max_retries=0)
    prompt = list(range(700, 700 + 2 * BLOCK))
    expected = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                         temperature=0).choices[0].text
    timeouts = 'kvmesh_gateway_pd_fallbacks_total{reason="prefill_timeout"}'
    failures = 'kvmesh_gateway_pd_fallbacks_total{reason="prefill_failed"}'
    before = _metric(pd_mesh, timeouts), _metric(pd_mesh, failures)
    proc = pd_mesh.procs.pop("p0")
    proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                          temperature=0)
        assert reply.choices[0].text == expected
        assert time.monotonic() - started >= PREFILL_TIMEOUT_S - 0.5
        # Prefilled on the decode worker: nothing was handed over.
        assert not reply.usage.prompt_tokens_details \
            or not reply.usage.prompt_tokens_details.cached_tokens
        assert _metric(pd_mesh, timeouts) - before[0] == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    killed = time.monotonic()
    waited = asyncio.run(seconds_until_unreachable(pd_mesh.router, "p0", killed, 5.0))
    assert waited < 1.5, waited  # the lease (3 s) and the probes (60 s) are slower
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected
    assert (_metric(pd_mesh, timeouts), _metric(pd_mesh, failures)) == (before[0] + 1,
                                                                        before[1])
