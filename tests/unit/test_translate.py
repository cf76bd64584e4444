import grpc
import pytest
from pydantic import ValidationError

from kvmesh.core.error_map import http_error_for, openai_error_body
from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest
from kvmesh.gateway.translate import (
    completion_fields_from_proto,
    finish_reason,
    logit_bias,
    requested_max_tokens,
    resolve_max_tokens,
    sampling_fields_from_proto,
    sampling_params,
    usage,
)
from kvmesh.v1 import inference_pb2

pytestmark = pytest.mark.unit


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def test_sampling_params_map_openai_fields() -> None:
    req = chat(temperature=0, top_p=0.9, top_k=5, seed=7, stop="END", n=2,
               presence_penalty=0.5, stop_token_ids=[2])
    p = sampling_params(req, max_tokens=33)
    assert p.HasField("temperature") and p.temperature == 0
    assert p.max_tokens == 33 and p.n == 2 and p.seed == 7 and p.top_k == 5
    assert abs(p.top_p - 0.9) < 1e-6 and abs(p.presence_penalty - 0.5) < 1e-6
    assert list(p.stop) == ["END"] and list(p.stop_token_ids) == [2]


def test_unset_sampling_fields_stay_unset() -> None:
    p = sampling_params(chat(), max_tokens=1)
    assert not p.HasField("temperature") and not p.HasField("seed")
    assert p.top_k == 0 and p.top_p == 0  # 0 = engine default in the contract


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert requested_max_tokens(chat(max_tokens=5, max_completion_tokens=9)) == 9
    assert requested_max_tokens(chat(max_tokens=5)) == 5


def test_context_length() -> None:
    assert resolve_max_tokens(None, 100, 4096, 512) == 512
    assert resolve_max_tokens(None, 4000, 4096, 512) == 96
    assert resolve_max_tokens(96, 4000, 4096, 512) == 96
    with pytest.raises(InvalidRequestError, match="maximum context length") as err:
        resolve_max_tokens(97, 4000, 4096, 512)
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        resolve_max_tokens(None, 4096, 4096, 512)


def test_request_validation() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        chat(temperature=3)
    req = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}])
    assert req.messages[0].text() == "ab"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompt == [1, 2]


def test_logit_bias_clamped_and_checked_against_the_vocabulary() -> None:
    p = sampling_params(chat(logit_bias={"5": 250, "7": -3.5, "9": -101}), max_tokens=4,
                        vocab_size=10)
    assert dict(p.logit_bias) == {5: 100.0, 7: -3.5, 9: -100.0}
    assert not sampling_params(chat(), max_tokens=4, vocab_size=10).logit_bias
    for bad, named in (({"10": 1}, "[10]"), ({"-1": 1}, "[-1]"), ({"x": 1, "2": 1}, "'x'")):
        with pytest.raises(InvalidRequestError) as err:
            logit_bias(bad, vocab_size=10)
        assert err.value.param == "logit_bias" and named in err.value.message
    with pytest.raises(ValidationError):
        chat(logit_bias={"5": "high"})


def test_usage_and_finish_reason() -> None:
    u = usage(10, 5, 4)
    assert (u.total_tokens, u.prompt_tokens_details) == (15, {"cached_tokens": 4})
    assert finish_reason("length") == "length" and finish_reason("weird") == "stop"


def test_grpc_sampling_options_round_trip_through_validation() -> None:
    opts = inference_pb2.SamplingOptions(max_tokens=3, temperature=0.0, stop=["x"],
                                         logit_bias={12: -100.0})
    fields = sampling_fields_from_proto("m", opts, stream=True)
    assert fields == {"model": "m", "stream": True, "max_tokens": 3, "temperature": 0.0,
                      "stop": ["x"], "logit_bias": {"12": -100.0}}
    assert chat(**fields).logit_bias == {"12": -100.0}


def test_grpc_prompt_batch_becomes_the_openai_batch() -> None:
    def fields(*prompts: inference_pb2.Prompt) -> object:
        return completion_fields_from_proto(inference_pb2.CompletionRequest(
            model="m", batch=inference_pb2.PromptBatch(prompts=prompts)))["prompt"]

    assert fields(inference_pb2.Prompt(text="a"), inference_pb2.Prompt(text="b")) == ["a", "b"]
    ids = inference_pb2.TokenIds
    assert fields(inference_pb2.Prompt(token_ids=ids(ids=[1, 2])),
                  inference_pb2.Prompt(token_ids=ids(ids=[3]))) == [[1, 2], [3]]
    for bad in ((), (inference_pb2.Prompt(),),
                (inference_pb2.Prompt(text="a"), inference_pb2.Prompt(token_ids=ids(ids=[1])))):
        with pytest.raises(InvalidRequestError) as err:
            fields(*bad)
        assert err.value.param == "batch"


def test_error_map() -> None:
    assert http_error_for(grpc.StatusCode.NOT_FOUND).status == 404
    assert http_error_for(grpc.StatusCode.INVALID_ARGUMENT).status == 400
    assert http_error_for(grpc.StatusCode.UNAVAILABLE).status == 503
    assert http_error_for(grpc.StatusCode.RESOURCE_EXHAUSTED).status == 429
    assert http_error_for(grpc.StatusCode.DATA_LOSS).status == 500
    body = openai_error_body("m", "t", param="p", code=400)
    assert body == {"error": {"message": "m", "type": "t", "param": "p", "code": 400}}
