"""Prefill/decode disaggregation with real vLLM CPU engines and real NIXL transfers.

One `kvmesh up --prefill 1 --decode 1` (one core each) with the router told to split
every request. References come from the prefill worker run as a whole-request engine
(same dtype, same eager mode), called directly over VllmEngine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import psutil
import pytest
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc
from transformers import AutoTokenizer

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e
MAX_TOKENS = 16
CONTEXT = 2048
SYSTEM = "You are the archivist of the Lighthouse Museum. " + " ".join(
    f"Record {i}: the keeper logged calm seas and a visit from ship number {i}."
    for i in range(45)
)


@pytest.fixture(scope="module")
def pd(model_dir: Path) -> Iterator[UpProcess]:
    with tempfile.TemporaryDirectory(prefix="kvm-pd-") as d:
        config = Path(d) / "pd.yaml"
        config.write_text(
            f"worker:\n  engine:\n    max_model_len: {CONTEXT}\n    kv_cache_space_gib: 1\n")
        up = UpProcess(Path(d), ("--prefill", "1", "--decode", "1", "--no-embeddings",
                                 "--disaggregation", "always", "--config", str(config)))
        try:
            yield up
        finally:
            up.interrupt()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(model_dir))


def _worker(up: UpProcess, role: str) -> dict:
    return next(w for w in up.state["workers"] if w["role"] == role)


def _request(ids: list[int], max_tokens: int, kv: str | None = None,
             rid: str = "") -> vllm_engine_pb2.GenerateRequest:
    request = vllm_engine_pb2.GenerateRequest(
        request_id=rid or f"test-{time.monotonic_ns()}",
        tokenized=vllm_engine_pb2.TokenizedInput(input_ids=ids),
        sampling_params=vllm_engine_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
        stream=False,
    )
    if kv is not None:
        request.kv_transfer_params_json = kv
    return request


def _generate(endpoint: str, request: vllm_engine_pb2.GenerateRequest
              ) -> vllm_engine_pb2.GenerateComplete:
    async def run() -> vllm_engine_pb2.GenerateComplete:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
            async for response in stub.Generate(request, timeout=300):
                if response.WhichOneof("response") == "complete":
                    return response.complete
        raise AssertionError("no GenerateComplete")

    return asyncio.run(run())


def _reference(up: UpProcess, ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy output of the prefill worker computing the whole request itself."""
    return list(_generate(_worker(up, "prefill")["endpoint"], _request(ids, max_tokens))
                .output_ids)


def _metrics(endpoint: str) -> dict[str, float]:
    """Unlabelled sums of a worker's vllm:* samples, by sample name[+source label]."""
    text = httpx.get(f"http://{endpoint}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("vllm:"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if 'source="' in name_labels:
            name += ":" + name_labels.split('source="', 1)[1].split('"', 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _held(endpoint: str) -> tuple[int, float]:
    """(running, KV usage) right after a one-token probe: the probe makes the engine
    step once, so its stats are fresh, and it frees its own block when done."""
    _generate(endpoint, _request([1, 2, 3], 1))

    async def loads() -> tuple[int, float]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            reply = await vllm_engine_pb2_grpc.VllmEngineStub(channel).GetLoads(
                vllm_engine_pb2.GetLoadsRequest(), timeout=10)
            return (sum(x.num_running_reqs + x.num_waiting_reqs for x in reply.loads),
                    max(x.token_usage for x in reply.loads))

    return asyncio.run(loads())


def _wait_idle(up: UpProcess, within_s: float = 15.0) -> None:
    """Both workers hold no request and no KV block, well before NIXL's 30 s lease
    would have freed the prefill worker's blocks on its own."""
    deadline = time.monotonic() + within_s
    state: dict[str, tuple[int, float]] = {}
    while time.monotonic() < deadline:
        state = {role: _held(_worker(up, role)["endpoint"]) for role in ("prefill", "decode")}
        if all(running == 0 and usage == 0.0 for running, usage in state.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"workers still hold requests/blocks: {state}")


def _prompts(tokenizer) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    def chat(system: str, user: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))

    near_limit = tokenizer.encode(" ".join(f"entry {i} reads fair." for i in range(2000)))
    return {
        "short": tokenizer.encode("The capital of France is"),
        "shared_a": chat(SYSTEM, "Which ship visited on record 7?"),
        "shared_b": chat(SYSTEM, "Summarise the weather in the log."),
        "near_limit": near_limit[: CONTEXT - MAX_TOKENS - 1],
    }


def test_pd_output_equals_aggregated_and_kv_came_over_nixl(pd: UpProcess, tokenizer) -> None:  # type: ignore[no-untyped-def]
    decode = _worker(pd, "decode")
    assert decode.get("metrics"), "decode worker exposes no /metrics"
    prompts = _prompts(tokenizer)
    assert len(prompts["shared_a"]) > 600 and len(prompts["near_limit"]) == CONTEXT - 17
    client = openai.OpenAI(base_url=pd.state["http"], api_key="x", max_retries=0)
    before = _metrics(decode["metrics"])
    for name, ids in prompts.items():
        expected = tokenizer.decode(_reference(pd, ids), skip_special_tokens=True)
        whole = client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS,
                                          temperature=0)
        assert whole.choices[0].text == expected, name
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS,
                                               temperature=0, stream=True)
            if c.choices)
        assert streamed == expected, name
    after = _metrics(decode["metrics"])

    def delta(source: str) -> float:
        key = f"vllm:prompt_tokens_by_source_total:{source}"
        return after.get(key, 0.0) - before.get(key, 0.0)

    # The decode worker computed (almost) none of the prompts: what it had not seen it
    # loaded from the prefill worker; repeats and the shared system prompt then hit
    # its own cache. At most the sub-block tail of each request is computed locally.
    slack = 2 * len(prompts) * 32
    total = 2 * sum(len(ids) for ids in prompts.values())
    fresh = len(prompts["shared_a"]) + len(prompts["near_limit"])
    assert delta("local_compute") <= slack, (delta("local_compute"), total)
    assert delta("external_kv_transfer") >= fresh - slack, (delta("external_kv_transfer"), fresh)
    assert delta("external_kv_transfer") + delta("local_cache_hit") >= total - slack
    assert after.get("vllm:nixl_bytes_transferred_sum", 0) > \
        before.get("vllm:nixl_bytes_transferred_sum", 0)
    router_reasons = httpx.get(
        f"http://{pd.state['router_metrics']}/metrics", timeout=5).text
    assert 'reason="pd:disaggregated:' in router_reasons


def test_cancel_mid_prefill_frees_both_workers(pd: UpProcess, tokenizer) -> None:  # type: ignore[no-untyped-def]
    _wait_idle(pd)
    ids = tokenizer.encode(" ".join(f"cancelled item {i} is blue." for i in range(220)))
    assert 1500 < len(ids) < CONTEXT - 64
    decode = _worker(pd, "decode")
    before = _metrics(decode["metrics"]).get("vllm:prompt_tokens_total", 0.0)
    # The client gives up long before a 1.5k-token prefill on one core is done.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(pd.state["http"] + "/completions", timeout=httpx.Timeout(10, read=0.3),
                   json={"model": MODEL, "prompt": ids, "max_tokens": 64, "stream": True})
    _wait_idle(pd)
    # The prefill leg was aborted, so no decode leg ever reached the decode worker
    # (only the idle probes' 3-token prompts did).
    after = _metrics(decode["metrics"]).get("vllm:prompt_tokens_total", 0.0)
    assert after - before < 100, after - before


def test_cancel_mid_decode_frees_both_workers(pd: UpProcess, tokenizer) -> None:  # type: ignore[no-untyped-def]
    _wait_idle(pd)
    ids = tokenizer.encode(" ".join(f"decoded item {i} is green." for i in range(100)))
    client = openai.OpenAI(base_url=pd.state["http"], api_key="x", max_retries=0)
    stream = client.completions.create(model=MODEL, prompt=ids, max_tokens=500,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].text)
        if got >= 3:
            break
    stream.close()
    assert got == 3
    _wait_idle(pd)


def test_dashboard_pd_queries_resolve_against_the_pd_mesh(pd: UpProcess) -> None:
    """The Grafana dashboard's P/D row reads series a live P/D mesh exports (found
    through the gateway's service discovery, after the traffic of the tests above)."""
    from tests.grafana import PD_ROW, exported_names, expressions, load_dashboard, metric_names

    base = pd.state["http"].removesuffix("/v1")
    groups = httpx.get(base + "/sd/prometheus", timeout=10).json()
    roles = {g["labels"].get("kvmesh_role") for g in groups} - {None}
    assert roles == {"prefill", "decode"}
    exported: set[str] = set()
    for group in groups:
        for target in group["targets"]:
            exported |= exported_names(httpx.get(f"http://{target}/metrics", timeout=10).text)
    pd_exprs = expressions(load_dashboard(), {PD_ROW})
    assert pd_exprs
    for expr in pd_exprs:
        missing = metric_names(expr) - exported
        assert not missing, f"{expr}: {sorted(missing)} not exported"


def test_prefill_worker_killed_after_prefill_decode_recomputes(pd: UpProcess, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Runs last: it kills the prefill worker (engine process tree included)."""
    prefill, decode = _worker(pd, "prefill"), _worker(pd, "decode")
    ids = tokenizer.encode(" ".join(f"survivor note {i} is kept." for i in range(120)))
    expected = _reference(pd, ids)
    # The gateway's prefill leg, by hand: then the prefill worker dies holding the KV.
    handoff = _generate(prefill["endpoint"], _request(
        ids, 1, json.dumps({"do_remote_decode": True}), rid="killed-prefill"))
    params = json.loads(handoff.kv_transfer_params_json)
    assert params["do_remote_prefill"] is True and params["remote_block_ids"]
    before = _metrics(decode["metrics"])
    tree = psutil.Process(prefill["pid"])
    victims = [tree, *tree.children(recursive=True)]
    for proc in victims:
        os.kill(proc.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    started = time.monotonic()
    out = _generate(decode["endpoint"], _request(ids, MAX_TOKENS, handoff.kv_transfer_params_json))
    assert list(out.output_ids) == expected
    assert time.monotonic() - started < 120  # never a hung request
    after = _metrics(decode["metrics"])
    assert after.get("vllm:nixl_num_failed_transfers_total", 0) > \
        before.get("vllm:nixl_num_failed_transfers_total", 0)

