"""Router + 2 workers + gateway as real processes on free ports (fake engines)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc
from transformers import AutoTokenizer

from kvmesh.v1 import inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc
from tests.waiting import eventually

from .conftest import Mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me about the mesh."}]


@pytest.fixture(scope="module")
def chat_prompt_ids(model_dir: Path) -> list[int]:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


def expected_echo(model_dir: Path, ids: list[int]) -> str:
    # The fake engine echoes the prompt's tokens; the gateway must detokenize them.
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return str(tok.decode(ids, skip_special_tokens=True))


def test_models_and_health(fake_mesh: Mesh, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "kvmesh"
    health = httpx.get(fake_mesh.http.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json()["models"] == [MODEL]


def test_kept_alive_requests_are_not_held_by_nagle(fake_mesh: Mesh) -> None:
    # With Nagle on at the gateway, every response after a connection's first waited
    # for the client's delayed ACK (>= 40 ms on Linux) before its second write left.
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(fake_mesh.http)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    took = []
    for _ in range(8):
        started = time.perf_counter()
        conn.request("GET", "/v1/models")
        conn.getresponse().read()
        took.append(time.perf_counter() - started)
    conn.close()
    assert min(took[1:]) < 0.035, took


def test_chat_tokenizes_once_and_detokenizes(
    client: openai.OpenAI, model_dir: Path, chat_prompt_ids: list[int]
) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    assert reply.choices[0].message.content == expected_echo(model_dir, chat_prompt_ids[:12])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(chat_prompt_ids)
    assert reply.usage.completion_tokens == 12


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=15)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=15, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


def test_n_choices_streamed_and_not(client: openai.OpenAI) -> None:
    # The fake engine answers every one of n choices, as vLLM does (index per choice).
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=3)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert len({c.message.content for c in full.choices}) == 1
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=3, stream=True))
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2]


def test_stop_string_ends_generation(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, stop=["helpful"]
    )
    assert reply.choices[0].message.content == "system\nYou are a "
    assert reply.choices[0].finish_reason == "stop"


def test_completions_text_tokens_and_echo(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="one two three four", max_tokens=50)
    # The fake engine stops ("stop") once it has echoed the whole prompt.
    assert reply.choices[0].text == "one two three four"
    assert reply.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model=MODEL, prompt="alpha beta", max_tokens=1, echo=True)
    assert echoed.choices[0].text == "alpha beta" + "alpha"
    by_ids = client.completions.create(model=MODEL, prompt=[28, 29, 30], max_tokens=3)
    assert by_ids.usage.prompt_tokens == 3 and by_ids.usage.completion_tokens == 3


def _prompt_part_as_vllm_shows_it(lp: object, prompt: list[str], top_n: int) -> None:
    """The echoed prompt's logprobs: its tokens first, the first with null logprob and
    top map, the others with the fake's values and the token plus the top_n."""
    tokens, values, tops = lp.tokens, lp.token_logprobs, lp.top_logprobs  # type: ignore[attr-defined]
    assert tokens[:len(prompt)] == prompt
    assert values[0] is None and tops[0] is None
    assert values[1:len(prompt)] == [-1 - (i % 4) / 4 for i in range(1, len(prompt))]
    for i in range(1, len(prompt)):
        assert len(tops[i]) == top_n + 1 and tops[i][prompt[i]] == values[i]
    offsets = [0]
    for token in tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets  # type: ignore[attr-defined]


def test_echo_with_logprobs_returns_prompt_logprobs(fake_mesh: Mesh,
                                                    client: openai.OpenAI) -> None:
    prompts = ["alpha beta gamma", "one two"]
    words = [["alpha", " beta", " gamma"], ["one", " two"]]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2, n=2,
                                      echo=True, logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice in reply.choices:
        prompt = words[choice.index // 2]
        # The fake echoes the prompt: the prompt's tokens, then its first two again.
        assert choice.text == "".join(prompt) + "".join(prompt[:2])
        assert choice.logprobs.tokens == [*prompt, *prompt[:2]]
        _prompt_part_as_vllm_shows_it(choice.logprobs, prompt, 2)
        assert choice.logprobs.token_logprobs[len(prompt):] == [-1.0, -1.0]
    chunks = list(client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=2,
                                            echo=True, logprobs=2, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert text == reply.choices[0].text
    assert streamed[0].tokens == [*words[0], words[0][0]]  # the prompt and first token
    whole = reply.choices[0].logprobs
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for lp in streamed for x in getattr(lp, key)] == getattr(whole, key)
    plain = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=2,
                                      logprobs=2)
    assert plain.choices[0].logprobs.tokens == words[0][:2]  # no echo, no prompt logprobs

    async def grpc_echo() -> list[inference_pb2.TokenLogprob]:
        async with grpc.aio.insecure_channel(fake_mesh.grpc) as channel:
            replies = [r async for r in inference_pb2_grpc.InferenceStub(channel).Complete(
                inference_pb2.CompletionRequest(
                    model=MODEL, text=prompts[0], echo=True, logprobs=2,
                    sampling=inference_pb2.SamplingOptions(max_tokens=2)))]
            return list(replies[-1].choices[0].logprobs)

    over_grpc = asyncio.run(grpc_echo())
    assert [t.token for t in over_grpc] == reply.choices[0].logprobs.tokens
    assert [t.HasField("logprob") for t in over_grpc] == [False] + [True] * 4
    assert [len(t.top_logprobs) for t in over_grpc] == [0] + [2] * 4


def test_streamed_tool_call_deltas_accumulate_in_the_openai_sdk(
        client: openai.OpenAI, model_dir: Path, chat_prompt_ids: list[int]) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    # The fake engine echoes the whole prompt and stops, so the named call's "arguments"
    # are that text (it enforces no schema); what matters is how the deltas accumulate.
    with client.chat.completions.stream(
            model=MODEL, messages=MESSAGES, max_tokens=200, tools=[tool],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    assert call.function.arguments == expected_echo(model_dir, chat_prompt_ids)


def test_openai_errors(fake_mesh: Mesh, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.body["type"] == "not_found_error"
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[])
    assert bad.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    raw = httpx.post(fake_mesh.http + "/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json", "x-request-id": "abc"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert raw.headers["x-request-id"] == "abc"


def test_logit_bias_errors_name_the_param(fake_mesh: Mesh, client: openai.OpenAI) -> None:
    vocab = 49152  # SmolLM2's
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       logit_bias={str(vocab): 5})
    assert unknown.value.body["param"] == "logit_bias" and str(vocab) in unknown.value.message
    with pytest.raises(openai.BadRequestError) as not_an_id:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                  logit_bias={"hello": 5})
    assert not_an_id.value.body["param"] == "logit_bias"
    # In range: accepted (the fake engine ignores it; real vLLM is tested in e2e).
    ok = client.completions.create(model=MODEL, prompt="x y", max_tokens=1,
                                   logit_bias={str(vocab - 1): 500})
    assert ok.choices[0].text == "x"

    async def grpc_unknown() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(fake_mesh.grpc) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in inference_pb2_grpc.InferenceStub(channel).Complete(
                        inference_pb2.CompletionRequest(
                            model=MODEL, text="x", sampling=inference_pb2.SamplingOptions(
                                max_tokens=1, logit_bias={vocab: 1.0}))):
                    pass
            return err.value

    err = asyncio.run(grpc_unknown())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.trailing_metadata())["kvmesh-error-param"] == "logit_bias"


def test_router_round_robin_over_registered_workers(fake_mesh: Mesh) -> None:
    async def route() -> list[str]:
        async with grpc.aio.insecure_channel(fake_mesh.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            out = []
            for i in range(4):
                d = await stub.Route(router_pb2.RouteRequest(
                    request_id=f"rr{i}", model=MODEL, token_ids=[1, 2, 3]))
                out.append(d.worker.worker_id)
                await stub.RequestFinished(router_pb2.RequestFinishedRequest(
                    request_id=f"rr{i}", worker_id=d.worker.worker_id))
            return out

    chosen = asyncio.run(route())
    assert sorted(set(chosen)) == ["w0", "w1"]
    assert chosen[0] != chosen[1] and chosen[:2] == chosen[2:]


def test_disconnect_mid_stream_cancels_the_worker_request(fake_mesh: Mesh) -> None:
    # 400 tokens at 20 ms each would take 8 s if nobody cancelled.
    prompt = " ".join(["word"] * 450)
    with httpx.stream(
        "POST", fake_mesh.http + "/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 400, "stream": True},
        timeout=30,
    ) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert _total_running(fake_mesh) == 1
    assert eventually(lambda: _total_running(fake_mesh), 0, timeout_s=4) == 0


def _total_running(mesh: Mesh) -> int:
    async def loads() -> int:
        total = 0
        for worker in mesh.workers:
            async with grpc.aio.insecure_channel(worker["endpoint"]) as channel:
                stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
                reply = await stub.GetLoads(vllm_engine_pb2.GetLoadsRequest(), timeout=2)
                total += sum(x.num_running_reqs for x in reply.loads)
        return total

    return asyncio.run(loads())


def test_grpc_inference_api(fake_mesh: Mesh, model_dir: Path,
                            chat_prompt_ids: list[int]) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(fake_mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            models = await stub.ListModels(inference_pb2.ListModelsRequest())
            assert [m.id for m in models.models] == [MODEL]
            request = inference_pb2.ChatRequest(
                model=MODEL,
                messages=[inference_pb2.ChatMessage(**m) for m in MESSAGES],
                sampling=inference_pb2.SamplingOptions(max_tokens=10),
                stream=True,
            )
            text, finish, usage = "", "", None
            async for msg in stub.Chat(request):
                for c in msg.choices:
                    text += c.text
                    finish = c.finish_reason or finish
                if msg.HasField("usage"):
                    usage = msg.usage
            assert text == expected_echo(model_dir, chat_prompt_ids[:10])
            assert finish == "length" and usage is not None and usage.completion_tokens == 10
            unary = [m async for m in stub.Complete(inference_pb2.CompletionRequest(
                model=MODEL, text="x y z", sampling=inference_pb2.SamplingOptions(max_tokens=2)))]
            assert len(unary) == 1 and unary[0].choices[0].text == "x y"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Chat(inference_pb2.ChatRequest(model="nope", messages=[
                        inference_pb2.ChatMessage(role="user", content="x")])):
                    pass
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Complete(inference_pb2.CompletionRequest(model=MODEL)):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


def test_grpc_complete_batch_of_prompts(fake_mesh: Mesh, client: openai.OpenAI) -> None:
    prompts = ["alpha beta gamma", "one two"]
    http = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2, n=2,
                                      echo=True)

    async def run() -> tuple[list[inference_pb2.GenerationResponse],
                             list[inference_pb2.GenerationResponse]]:
        async with grpc.aio.insecure_channel(fake_mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            def request(stream: bool, batch: inference_pb2.PromptBatch,
                        ) -> inference_pb2.CompletionRequest:
                return inference_pb2.CompletionRequest(
                    model=MODEL, batch=batch, echo=True, stream=stream,
                    sampling=inference_pb2.SamplingOptions(max_tokens=2, n=2))

            texts = inference_pb2.PromptBatch(
                prompts=[inference_pb2.Prompt(text=p) for p in prompts])
            whole = [r async for r in stub.Complete(request(False, texts))]
            streamed = [r async for r in stub.Complete(request(True, texts))]
            mixed = inference_pb2.PromptBatch(prompts=[
                inference_pb2.Prompt(text="a"),
                inference_pb2.Prompt(token_ids=inference_pb2.TokenIds(ids=[28]))])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Complete(request(False, mixed)):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(err.value.trailing_metadata())["kvmesh-error-param"] == "batch"
            return whole, streamed

    whole, streamed = asyncio.run(run())
    assert len(whole) == 1
    assert [(c.index, c.text) for c in whole[0].choices] == \
        [(c.index, c.text) for c in http.choices]
    assert whole[0].usage.prompt_tokens == http.usage.prompt_tokens == 5
    assert whole[0].usage.completion_tokens == http.usage.completion_tokens == 8
    by_index: dict[int, str] = {}
    for r in streamed:
        for c in r.choices:
            by_index[c.index] = by_index.get(c.index, "") + c.text
    assert by_index == {c.index: c.text for c in http.choices}
    assert streamed[-1].usage.completion_tokens == 8


def test_worker_registered_by_address(fake_mesh: Mesh) -> None:
    info = fake_mesh.start_worker("plain", register=False)
    router = start_router(fake_mesh, "router2", "--worker", info["endpoint"])

    async def listed() -> router_pb2.ListWorkersResponse:
        async with grpc.aio.insecure_channel(router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                reply = await stub.ListWorkers(router_pb2.ListWorkersRequest())
                if reply.workers:
                    return reply
                await asyncio.sleep(0.1)
        raise TimeoutError

    reply = asyncio.run(listed())
    w = reply.workers[0].worker
    assert (w.endpoint, w.model, w.block_size, w.self_registered) == (
        info["endpoint"], MODEL, 32, False)


def test_dead_worker_is_routed_around_then_expired(
    fake_mesh: Mesh, client: openai.OpenAI
) -> None:
    victim = fake_mesh.procs["w1"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=5)
    for _ in range(4):  # round robin would hit the dead worker every other time
        reply = client.completions.create(model=MODEL, prompt="still here", max_tokens=2)
        assert reply.choices[0].text == "still here"

    async def workers() -> list[str]:
        async with grpc.aio.insecure_channel(fake_mesh.router) as channel:
            reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest())
            return [s.worker.worker_id for s in reply.workers]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "w1" in asyncio.run(workers()):
        time.sleep(0.2)
    assert asyncio.run(workers()) == ["w0"]


def test_router_metrics(fake_mesh: Mesh, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="count me", max_tokens=1)
    text = httpx.get(f"http://{fake_mesh.router_metrics}/metrics").text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines() if line and not line.startswith("#")
    }
    assert samples['kvmesh_router_decisions_total{policy="round_robin",reason="round_robin"}'] >= 1
    assert sum(v for k, v in samples.items() if k.startswith("kvmesh_router_workers{")) >= 1
    assert samples["kvmesh_router_decision_seconds_count{policy=\"round_robin\"}"] >= 1
    assert "kvmesh_router_index_blocks" in samples


def test_n_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 1  # the fake echoes
    assert reply.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=2, stream=True))
    assert {c.choices[0].finish_reason for c in chunks if c.choices} >= {"length"}
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
