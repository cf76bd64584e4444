"""The gateway's prefill and decode legs (request building, the prefill leg's stream)."""

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from smg_grpc_proto import vllm_engine_pb2

from kvmesh.bench.pd import Result, _summary, memcpy_gb_s
from kvmesh.gateway.mesh import MeshClient
from kvmesh.gateway.pd import (
    PdMetrics,
    generate_request,
    handoff,
    pd_fallback_reason,
    prefill_request,
)
from kvmesh.gateway.router_client import RouterClient
from kvmesh.v1 import common_pb2

pytestmark = pytest.mark.unit


def test_prefill_leg_is_one_token_one_choice_remote_decode() -> None:
    sampling = vllm_engine_pb2.SamplingParams(temperature=0, max_tokens=50, min_tokens=5,
                                              n=3, logprobs=2, ignore_eos=True)
    req = prefill_request("r1", [1, 2, 3], "abc", sampling)
    assert req.request_id == "r1-prefill" and not req.stream
    assert list(req.tokenized.input_ids) == [1, 2, 3]
    p = req.sampling_params
    assert (p.max_tokens, p.min_tokens, p.n, p.HasField("logprobs")) == (1, 0, 1, False)
    assert p.ignore_eos and p.temperature == 0
    assert json.loads(req.kv_transfer_params_json)["do_remote_decode"] is True
    # The caller's sampling is untouched (the decode leg uses it as is).
    assert (sampling.max_tokens, sampling.n) == (50, 3)


def test_decode_leg_carries_the_handover_verbatim() -> None:
    sampling = vllm_engine_pb2.SamplingParams(max_tokens=9)
    raw = '{"do_remote_prefill": true, "remote_block_ids": [[1, 2]], "remote_port": 5}'
    req = generate_request("r1", [4, 5], "", sampling, raw)
    assert req.kv_transfer_params_json == raw and req.stream
    assert req.sampling_params.max_tokens == 9
    assert not generate_request("r1", [4], "", sampling).HasField("kv_transfer_params_json")


def test_handoff_only_from_a_complete_with_remote_prefill_params() -> None:
    def complete(params: str | None) -> vllm_engine_pb2.GenerateResponse:
        return vllm_engine_pb2.GenerateResponse(
            complete=vllm_engine_pb2.GenerateComplete(kv_transfer_params_json=params))

    raw = '{"do_remote_prefill": true, "remote_engine_id": "e"}'
    assert handoff(complete(raw)) == raw
    assert handoff(complete(None)) is None
    assert handoff(complete("not json")) is None
    assert handoff(complete('{"do_remote_prefill": false}')) is None
    chunk = vllm_engine_pb2.GenerateResponse(chunk=vllm_engine_pb2.GenerateStreamChunk())
    assert handoff(chunk) is None


def test_prefill_leg_reads_its_stream_to_the_end() -> None:
    """The hand-over rides on the last message; the leg still reads to the stream's end,
    so the RPC (and its tracing span) finishes then, not whenever the GC collects it."""
    raw = '{"do_remote_prefill": true, "remote_engine_id": "e"}'
    seen: list[str] = []

    class Call:
        def __aiter__(self) -> AsyncIterator[vllm_engine_pb2.GenerateResponse]:
            return self._stream()

        async def _stream(self) -> AsyncIterator[vllm_engine_pb2.GenerateResponse]:
            yield vllm_engine_pb2.GenerateResponse(
                complete=vllm_engine_pb2.GenerateComplete(kv_transfer_params_json=raw))
            seen.append("end of stream")

        def cancel(self) -> bool:
            seen.append("cancel")
            return False

    class Stub:
        def Generate(self, request: vllm_engine_pb2.GenerateRequest, timeout: float,
                     metadata: object = None) -> Call:
            seen.append(request.request_id)
            return Call()

    async def run() -> str | None:
        client = MeshClient(RouterClient(["127.0.0.1:1"], 1, 1, lambda: ([], set())),
                            request_timeout_s=5)
        client.worker = lambda endpoint: Stub()
        client._release = lambda request_id, worker_id, router=None, lost=False: seen.append(
            f"release {worker_id}")
        prefill = common_pb2.WorkerInfo(worker_id="p0", endpoint="127.0.0.1:2")
        return await client._prefill("r1", prefill, [1, 2, 3], "", vllm_engine_pb2.SamplingParams(
            max_tokens=4))

    assert asyncio.run(run()) == raw
    assert seen == ["r1-prefill", "end of stream", "cancel", "release p0"]


def test_multiple_choices_and_prompt_logprobs_prefill_locally() -> None:
    assert pd_fallback_reason(vllm_engine_pb2.SamplingParams(n=1, logprobs=2)) is None
    assert pd_fallback_reason(vllm_engine_pb2.SamplingParams(n=2)) == "multiple_choices"
    assert pd_fallback_reason(
        vllm_engine_pb2.SamplingParams(n=1, prompt_logprobs=0)) == "prompt_logprobs"


def test_metrics_have_their_own_registry() -> None:
    a, b = PdMetrics(), PdMetrics()
    a.fallbacks.labels("prefill_failed").inc()
    assert b.registry.get_sample_value(
        "kvmesh_gateway_pd_fallbacks_total", {"reason": "prefill_failed"}) is None
    assert a.registry.get_sample_value(
        "kvmesh_gateway_pd_fallbacks_total", {"reason": "prefill_failed"}) == 1.0


def test_bench_summary_and_memcpy() -> None:
    results = [Result("short", 0.1, [0.01, 0.02, 0.5], 4), Result("long", 2.0, [], 1)]
    s = _summary(results)
    assert s["short_itl_max_s"] == 0.5 and s["long_ttft_p50_s"] == 2.0
    assert s["output_tokens"] == 5
    assert memcpy_gb_s(1 << 20) > 0.1
