"""Auth, limits and error statuses of a gateway with keys and limits set (fake engine)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from kvmesh.v1 import inference_pb2, inference_pb2_grpc

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me about the mesh, at length please."}]


@pytest.fixture(scope="module")
def mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        mesh.workers = [mesh.start_worker("w0")]
        env = {**os.environ, "KVMESH_GATEWAY_MAX_BODY_BYTES": "20000",
               "KVMESH_GATEWAY_RETRY_AFTER_S": "3"}
        mesh.start_gateway("--api-key", "key-one", "--api-key", "key-two",
                           "--max-streams-per-key", "1", "--max-prompt-tokens", "100",
                           env=env, timeout_s=180)
        yield mesh


def client(mesh: Mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.http, api_key=key, max_retries=0)


def test_api_keys(mesh: Mesh) -> None:
    for key in ("key-one", "key-two"):
        reply = client(mesh, key).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3)
        assert reply.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError) as err:
        client(mesh, "key-three").models.list()
    assert err.value.body["type"] == "authentication_error"
    missing = httpx.get(mesh.http + "/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    # Health checks need no key.
    assert httpx.get(mesh.http.removesuffix("/v1") + "/health").status_code == 200


def test_stream_limit_per_key_is_429_with_retry_after(mesh: Mesh) -> None:
    # Long enough (800 tokens at the fake engine's 5 ms) that the held stream is still
    # generating when the second request arrives, however loaded the machine is.
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 800, "stream": True}
    first_open = threading.Event()
    finish = threading.Event()

    def hold_stream() -> None:
        with httpx.stream("POST", mesh.http + "/chat/completions", json=body, timeout=30,
                          headers={"authorization": "Bearer key-one"}) as response:
            lines = response.iter_lines()
            next(lines)
            first_open.set()
            finish.wait(30)
            assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"

    holder = threading.Thread(target=hold_stream)
    holder.start()
    try:
        assert first_open.wait(30)
        second = httpx.post(mesh.http + "/chat/completions", json=body, timeout=30,
                            headers={"authorization": "Bearer key-one"})
        assert second.status_code == 429
        assert second.headers["retry-after"] == "3"
        assert second.json()["error"]["type"] == "rate_limit_error"
        # The other key has its own budget; non-streaming requests are not counted.
        other = client(mesh, "key-two").chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3, stream=True)
        assert len(list(other)) > 1
        client(mesh, "key-one").chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2)
    finally:
        finish.set()
        holder.join()
    # The held stream ended: its slot is free again.
    again = client(mesh, "key-one").chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, stream=True)
    assert len(list(again)) > 1


def test_prompt_and_body_limits(mesh: Mesh) -> None:
    c = client(mesh, "key-one")
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, max_tokens=2,
                                  messages=[{"role": "user", "content": "word " * 150}])
    assert err.value.body["param"] == "messages" and "at most 100" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt=list(range(1, 150)), max_tokens=2)
    assert err.value.body["param"] == "prompt"
    big = httpx.post(mesh.http + "/chat/completions", timeout=30,
                     headers={"authorization": "Bearer key-one"},
                     json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == 413
    # The same without Content-Length (a chunked body) is measured as it arrives.
    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]})
    chunked = httpx.post(mesh.http + "/chat/completions", timeout=30,
                         headers={"authorization": "Bearer key-one", "x-request-id": "big-1",
                                  "content-type": "application/json"},
                         content=(payload[i:i + 4096].encode()
                                  for i in range(0, len(payload), 4096)))
    assert chunked.status_code == 413 and chunked.headers["x-request-id"] == "big-1"
    small = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    ok = httpx.post(mesh.http + "/chat/completions", timeout=30,
                    headers={"authorization": "Bearer key-one",
                             "content-type": "application/json"},
                    content=(small[i:i + 16].encode() for i in range(0, len(small), 16)))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_errors_name_params_and_request_id_is_echoed_and_logged(mesh: Mesh) -> None:
    c = client(mesh, "key-one")
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="nope", messages=MESSAGES)
    assert nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as ctx:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100000)
    assert ctx.value.body["param"] == "max_tokens"
    assert "maximum context length" in ctx.value.body["message"]
    with pytest.raises(openai.BadRequestError) as tools:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice="required")
    assert tools.value.body["param"] == "tool_choice"
    rid = "test-request-id-4242"
    reply = httpx.post(mesh.http + "/chat/completions", timeout=30,
                       headers={"authorization": "Bearer key-one", "x-request-id": rid},
                       json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert reply.status_code == 200 and reply.headers["x-request-id"] == rid
    log = (mesh.dir / "gateway.log").read_text().splitlines()
    assert any("request done /v1/chat/completions" in line and "status=200" in line
               and f"request_id={rid}" in line for line in log)
    assert not any("key-one" in line for line in log)


def _grpc_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None and status.code == err.code().value[0]
    return status


def _detail(status: status_pb2.Status, kind: type) -> object:
    for any_detail in status.details:
        if any_detail.Is(kind.DESCRIPTOR):
            detail = kind()
            any_detail.Unpack(detail)
            return detail
    raise AssertionError(f"no {kind.__name__} in {status}")


def test_grpc_auth_and_rich_status_details(mesh: Mesh) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.ChatRequest(
                model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                sampling=inference_pb2.SamplingOptions(max_tokens=3))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Chat(request)]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = _detail(_grpc_status(err.value), error_details_pb2.ErrorInfo)
            assert info.reason == "authentication_error"  # type: ignore[attr-defined]
            auth = (("authorization", "Bearer key-two"),)
            replies = [r async for r in stub.Chat(request, metadata=auth)]
            assert replies[-1].usage.completion_tokens == 3
            bad = inference_pb2.ChatRequest(
                model=MODEL, messages=request.messages,
                sampling=inference_pb2.SamplingOptions(temperature=7))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Chat(bad, metadata=auth)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            violation = _detail(_grpc_status(err.value), error_details_pb2.BadRequest)
            assert violation.field_violations[0].field == "temperature"  # type: ignore[attr-defined]
            forced = inference_pb2.ChatRequest(
                model=MODEL, messages=request.messages,
                tool_choice=inference_pb2.ToolChoice(function="missing"),
                tools=[inference_pb2.Tool(name="get_weather", parameters_json="{}")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Chat(forced, metadata=auth)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(err.value.trailing_metadata())["kvmesh-error-param"] == "tool_choice"
            # Streams count against the key's stream budget, HTTP and gRPC alike.
            long = inference_pb2.ChatRequest(
                model=MODEL, messages=request.messages, stream=True,
                sampling=inference_pb2.SamplingOptions(max_tokens=25))
            first = stub.Chat(long, metadata=auth)
            await first.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Chat(long, metadata=auth)]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry = _detail(_grpc_status(err.value), error_details_pb2.RetryInfo)
            assert retry.retry_delay.seconds == 3  # type: ignore[attr-defined]
            first.cancel()
            # Embed checks the key too; authenticated, the (generative) fake engine
            # refuses it as vLLM does: no pooler.
            embed = inference_pb2.EmbedRequest(
                model=MODEL, inputs=[inference_pb2.EmbedInput(text="hi")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Embed(embed)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Embed(embed, metadata=auth)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not support pooling" in (err.value.details() or "")

    asyncio.run(run())


def test_auth_failures_are_counted(mesh: Mesh) -> None:
    """Rejected keys, HTTP and gRPC, show up in kvmesh_gateway_auth_failures_total."""
    from tests.prom import Scrape

    gateway = mesh.http.removeprefix("http://").removesuffix("/v1")

    def failures(reason: str) -> float:
        return Scrape.of(gateway).total("kvmesh_gateway_auth_failures_total", reason=reason)

    before = {r: failures(r) for r in ("missing_key", "invalid_key")}
    assert httpx.get(mesh.http + "/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(mesh, "wrong").models.list()

    async def grpc_calls() -> None:
        async with grpc.aio.insecure_channel(mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.ChatRequest(
                model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="hi")])
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [r async for r in stub.Chat(request, metadata=metadata)]
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(grpc_calls())
    assert failures("missing_key") - before["missing_key"] == 2
    assert failures("invalid_key") - before["invalid_key"] == 2


def test_worker_failure_is_503(mesh: Mesh) -> None:
    """Last in this module: it kills the only worker. Until the router notices, the
    gateway's route lands on a dead worker, re-routes once, finds none: 503."""
    worker = mesh.procs["w0"]
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    reply = httpx.post(mesh.http + "/chat/completions", timeout=60,
                       headers={"authorization": "Bearer key-one"},
                       json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["type"] == "service_unavailable"
