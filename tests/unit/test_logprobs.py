"""Logprobs in vLLM's shapes, and what the gateway asks the worker for (pure)."""

import pytest

from kvmesh.gateway.logprobs import (
    MAX_TOP_LOGPROBS,
    TokenLogprob,
    completion_logprobs,
    prompt_logprobs_to_request,
)
from kvmesh.gateway.schemas import CompletionRequest
from kvmesh.gateway.translate import sampling_params

pytestmark = pytest.mark.unit
TEXT = {1: "The", 2: " cat", 3: " sat", 4: " on", 9: " dog"}


def test_echoed_prompt_first_token_has_null_logprob_and_top() -> None:
    items = [
        TokenLogprob(1, None),
        TokenLogprob(2, -3.5, ((2, -3.5), (9, -0.5), (4, -1.0))),
        TokenLogprob(3, float("-inf"), ((3, float("-inf")), (4, -0.1))),
    ]
    lp = completion_logprobs(items, 2, TEXT.__getitem__, 0)
    assert lp["tokens"] == ["The", " cat", " sat"]
    assert lp["token_logprobs"] == [None, -3.5, -9999.0]
    # The token itself, then the top 2 (as vLLM's server: up to top_n + 1 entries).
    assert lp["top_logprobs"] == [None, {" cat": -3.5, " dog": -0.5, " on": -1.0},
                                  {" sat": -9999.0, " on": -0.1}]
    assert lp["text_offset"] == [0, 3, 7]


def test_prompt_logprobs_ask_one_more_alternative_up_to_the_limit() -> None:
    assert prompt_logprobs_to_request(0) == 1
    assert prompt_logprobs_to_request(5) == 6
    assert prompt_logprobs_to_request(MAX_TOP_LOGPROBS) == MAX_TOP_LOGPROBS


def test_echo_with_logprobs_requests_prompt_logprobs() -> None:
    def params(**kw: object):  # type: ignore[no-untyped-def]
        return sampling_params(CompletionRequest.model_validate(
            {"model": "m", "prompt": "hi", **kw}), max_tokens=4)

    echoed = params(echo=True, logprobs=3)
    assert echoed.logprobs == 3 and echoed.prompt_logprobs == 4
    assert not params(logprobs=3).HasField("prompt_logprobs")
    assert not params(echo=True).HasField("prompt_logprobs")
    assert not params(echo=True).HasField("logprobs")
