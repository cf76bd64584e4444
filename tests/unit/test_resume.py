"""Mid-stream resume: what can be resumed, and the continuation's request (pure)."""

from __future__ import annotations

import pytest
from smg_grpc_proto import vllm_engine_pb2

from kvmesh.gateway.resume import (
    as_original,
    budget_spent,
    continuation,
    length_complete,
    resume_refusal,
)

pytestmark = pytest.mark.unit


def test_plain_sampling_logprobs_and_repetition_penalty_resume() -> None:
    assert resume_refusal(vllm_engine_pb2.SamplingParams(n=1, max_tokens=5)) is None
    assert resume_refusal(vllm_engine_pb2.SamplingParams(
        n=1, temperature=0.7, seed=3, logprobs=2, repetition_penalty=1.2)) is None


@pytest.mark.parametrize(("params", "why"), [
    (vllm_engine_pb2.SamplingParams(n=2), "n=2"),
    (vllm_engine_pb2.SamplingParams(n=1, json_schema="{}"), "structured output"),
    (vllm_engine_pb2.SamplingParams(n=1, regex="a+"), "structured output"),
    (vllm_engine_pb2.SamplingParams(n=1, presence_penalty=0.5), "presence/frequency"),
    (vllm_engine_pb2.SamplingParams(n=1, frequency_penalty=-0.1), "presence/frequency"),
    (vllm_engine_pb2.SamplingParams(n=1, truncate_prompt_tokens=10), "truncate"),
])
def test_what_cannot_be_resumed_says_why(params: vllm_engine_pb2.SamplingParams,
                                         why: str) -> None:
    refusal = resume_refusal(params)
    assert refusal is not None and why in refusal


def test_continuation_is_prompt_plus_sent_with_the_rest_of_the_budget() -> None:
    sampling = vllm_engine_pb2.SamplingParams(
        n=1, max_tokens=10, min_tokens=4, temperature=0.5, seed=7, stop=["x"], logprobs=1,
        prompt_logprobs=0)
    ids, params = continuation([1, 2, 3], [9, 8, 7], sampling)
    assert ids == [1, 2, 3, 9, 8, 7]
    assert params.max_tokens == 7 and params.min_tokens == 1
    # Same settings otherwise; the seed is passed on unchanged; prompt logprobs were sent.
    assert params.temperature == 0.5 and params.seed == 7 and list(params.stop) == ["x"]
    assert params.logprobs == 1 and not params.HasField("prompt_logprobs")
    assert sampling.max_tokens == 10  # the original is untouched
    _, more = continuation([1], [5] * 6, sampling)
    assert more.min_tokens == 0


def test_budget_spent_and_the_missing_complete() -> None:
    sampling = vllm_engine_pb2.SamplingParams(max_tokens=3)
    assert not budget_spent(2, sampling) and budget_spent(3, sampling)
    assert not budget_spent(100, vllm_engine_pb2.SamplingParams())
    complete = length_complete(11, 3).complete
    assert (complete.finish_reason, complete.prompt_tokens, complete.completion_tokens) == (
        "length", 11, 3)


def test_continuation_messages_count_as_the_original_request() -> None:
    chunk = vllm_engine_pb2.GenerateResponse(chunk=vllm_engine_pb2.GenerateStreamChunk(
        token_ids=[4], prompt_tokens=15, cached_tokens=14))
    as_original(chunk, prompt_tokens=10, sent_before=5)
    assert (chunk.chunk.prompt_tokens, chunk.chunk.cached_tokens) == (10, 10)
    done = vllm_engine_pb2.GenerateResponse(complete=vllm_engine_pb2.GenerateComplete(
        prompt_tokens=15, completion_tokens=3, cached_tokens=4))
    as_original(done, prompt_tokens=10, sent_before=5)
    assert (done.complete.prompt_tokens, done.complete.completion_tokens,
            done.complete.cached_tokens) == (10, 8, 4)
