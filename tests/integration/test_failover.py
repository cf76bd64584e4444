"""Mid-stream failover: a worker process SIGKILLed under 32 concurrent streams (fake
engines whose output is a fixed chain, so a resumed stream must equal the
uninterrupted one token for token). Over HTTP SSE, over the Inference gRPC API, and
for the decode worker of a P/D pair. The real-vLLM version is
tests/e2e/test_failover_vllm.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.v1 import inference_pb2
from tests.failover_streams import (
    StreamResult,
    figures,
    grpc_stream,
    http_chat_stream,
    kill_during_streams,
    seconds_until_unreachable,
)

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
CHAIN = {"KVMESH_WORKER_FAKE_OUTPUT": "chain"}
#: The router probes rarely here: leaving the routing set within 1 s must come from
#: the gateway's report of the lost worker, not from the router's own polling.
SLOW_PROBES = {"KVMESH_ROUTER_PROBE_INTERVAL_S": "5"}
MAX_TOKENS = 80


@pytest.fixture
def mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh, env=SLOW_PROBES)
        mesh.workers = [mesh.start_worker("w0", env=CHAIN), mesh.start_worker("w1", env=CHAIN)]
        mesh.start_gateway()
        yield mesh


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Stream number {i % 4} please."}]


def completion_request(i: int) -> inference_pb2.CompletionRequest:
    """Completions over gRPC: their messages carry the token ids."""
    return inference_pb2.CompletionRequest(
        model=MODEL, stream=True, text=messages(i)[0]["content"],
        sampling=inference_pb2.SamplingOptions(max_tokens=MAX_TOKENS))


def reference(mesh: Mesh, i: int, **extra: object) -> dict:
    """The uninterrupted answer (non-streamed) for stream ``i``'s prompt."""
    reply = httpx.post(f"{mesh.http}/chat/completions", timeout=30, json={
        "model": MODEL, "messages": messages(i), "max_tokens": MAX_TOKENS, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


def kill(mesh: Mesh, name: str) -> None:
    os.kill(mesh.procs[name].pid, signal.SIGKILL)


def test_http_streams_resume_when_their_worker_is_killed(mesh: Mesh) -> None:
    refs = [reference(mesh, i) for i in range(4)]
    multi = {4, 13, 22, 31}  # n=2: not resumable, must end with a clear error

    async def run() -> tuple[list[StreamResult], float]:
        async with httpx.AsyncClient(timeout=60) as client:
            def stream(i: int):  # type: ignore[no-untyped-def]
                body = {"model": MODEL, "messages": messages(i), "max_tokens": MAX_TOKENS,
                        **({"n": 2} if i in multi else {})}
                return lambda result: http_chat_stream(client, mesh.http, body, result)

            unreachable: list[asyncio.Task[float]] = []

            def killer() -> None:
                kill(mesh, "w0")
                unreachable.append(asyncio.create_task(seconds_until_unreachable(
                    mesh.router, "w0", time.monotonic())))

            results, _ = await kill_during_streams(
                [stream(i) for i in range(32)], killer, min_pieces=5, timeout_s=30)
            return results, await unreachable[0]

    results, left_s = asyncio.run(run())
    stats = figures(results)
    metrics = httpx.get(mesh.http.removesuffix("/v1") + "/metrics").text
    resumed = _counter(metrics, 'kvmesh_gateway_failovers_total{outcome="resumed"}')
    errored = _counter(metrics, 'kvmesh_gateway_failovers_total{outcome="error"}')
    print(f"\nHTTP, 32 streams, w0 SIGKILLed: {stats}; on the killed worker: {resumed:.0f} "
          f"resumed, {errored:.0f} ended with an error; w0 out of routing after "
          f"{left_s * 1000:.0f} ms")
    assert stats["hung"] == 0
    assert left_s < 1.0
    assert resumed >= 12  # round robin put about half of the 28 n=1 streams on w0
    for i, r in enumerate(results):
        ref = refs[i % 4]
        if i in multi and r.error is not None:
            assert "cannot be resumed" in r.error and "n=2" in r.error, r.error
            continue
        assert r.completed, (i, r)
        for choice in range(r.n):
            # Token for token the uninterrupted answer: nothing repeated, nothing lost.
            assert r.text[choice] == ref["choices"][0]["message"]["content"], i
            assert r.finish[choice] == "length"
        assert r.usage is not None
        assert r.usage["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        assert r.usage["completion_tokens"] == MAX_TOKENS * r.n
    errors = sum(r.error is not None for r in results)
    assert errors == errored and errors <= len(multi)
    # The dead worker is out of the gateway's routing too: new requests all succeed.
    for i in range(4):
        assert reference(mesh, i)["choices"][0]["message"]["content"] == \
            refs[i]["choices"][0]["message"]["content"]


def test_grpc_streams_resume_token_for_token(mesh: Mesh) -> None:
    async def run() -> list[StreamResult]:
        async with grpc.aio.insecure_channel(mesh.grpc) as channel:
            def stream(i: int):  # type: ignore[no-untyped-def]
                return lambda result: grpc_stream(channel, completion_request(i), result)

            results, _ = await kill_during_streams(
                [stream(i) for i in range(32)], lambda: kill(mesh, "w1"), min_pieces=5,
                timeout_s=30)
            return results

    async def uninterrupted(i: int) -> list[int]:
        async with grpc.aio.insecure_channel(mesh.grpc) as channel:
            result = StreamResult()
            await grpc_stream(channel, completion_request(i), result)
            assert result.completed and len(result.token_ids) == MAX_TOKENS
            return result.token_ids

    refs = [asyncio.run(uninterrupted(i)) for i in range(4)]
    results = asyncio.run(run())
    stats = figures(results)
    metrics = httpx.get(mesh.http.removesuffix("/v1") + "/metrics").text
    resumed = _counter(metrics, 'kvmesh_gateway_failovers_total{outcome="resumed"}')
    print(f"\ngRPC, 32 streams, w1 SIGKILLed: {stats}; {resumed:.0f} resumed")
    assert stats["hung"] == 0 and stats["completed"] == 32
    assert resumed >= 12
    for i, r in enumerate(results):
        assert r.token_ids == refs[i % 4], i  # exactly the uninterrupted token ids
        assert r.usage == {"prompt_tokens": r.usage["prompt_tokens"],
                           "completion_tokens": MAX_TOKENS}


def test_unresumable_stream_ends_with_a_clear_error(mesh: Mesh) -> None:
    """Structured output cannot be resumed (the grammar would restart): its stream,
    on the killed worker, ends with an `unavailable` error saying why."""
    async def run() -> list[StreamResult]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": MODEL, "messages": messages(0), "max_tokens": MAX_TOKENS,
                    "presence_penalty": 0.5}
            results, _ = await kill_during_streams(
                [lambda r: http_chat_stream(client, mesh.http, body, r) for _ in range(2)],
                lambda: (kill(mesh, "w0"), kill(mesh, "w1")), min_pieces=3, timeout_s=30)
            return results

    results = asyncio.run(run())
    assert [r.hung for r in results] == [False, False]
    for r in results:
        assert r.error is not None and "cannot be resumed" in r.error and \
            "presence/frequency" in r.error, r


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_pd_decode_worker_killed_mid_stream(model_dir: Path) -> None:
    """Disaggregated: the decode worker dies; each stream resumes on the other decode
    worker (its continuation prefilled on the prefill worker and handed over)."""
    with running_mesh() as pd:
        pd.router = start_router(pd, "router", "--disaggregation", "always", env=SLOW_PROBES)
        block = ["--block-size", "32"]
        pd.start_worker("p0", "--role", "prefill", *block, env=CHAIN)
        pd.start_worker("d0", "--role", "decode", *block, env=CHAIN)
        pd.start_worker("d1", "--role", "decode", *block, env=CHAIN)
        pd.start_gateway()
        refs = [reference(pd, i) for i in range(4)]

        async def run() -> list[StreamResult]:
            async with httpx.AsyncClient(timeout=60) as client:
                def stream(i: int):  # type: ignore[no-untyped-def]
                    body = {"model": MODEL, "messages": messages(i), "max_tokens": MAX_TOKENS}
                    return lambda result: http_chat_stream(client, pd.http, body, result)

                results, _ = await kill_during_streams(
                    [stream(i) for i in range(32)], lambda: kill(pd, "d0"), min_pieces=5,
                    timeout_s=30)
                return results

        results = asyncio.run(run())
        metrics = httpx.get(pd.http.removesuffix("/v1") + "/metrics").text
        resumed = _counter(metrics, 'kvmesh_gateway_failovers_total{outcome="resumed"}')
        disaggregated = _counter(metrics, 'kvmesh_gateway_pd_requests_total{mode="disaggregated"}')
        stats = figures(results)
        print(f"\nP/D, 32 streams, decode worker d0 SIGKILLed: {stats}; {resumed:.0f} resumed "
              f"on d1; {disaggregated:.0f} disaggregated legs")
        assert stats["hung"] == 0 and stats["completed"] == 32
        assert resumed >= 8
        assert disaggregated >= 32 + 4 + resumed  # the continuations went through P/D too
        for i, r in enumerate(results):
            assert r.text[0] == refs[i % 4]["choices"][0]["message"]["content"], i
            assert r.usage is not None and r.usage["completion_tokens"] == MAX_TOKENS
