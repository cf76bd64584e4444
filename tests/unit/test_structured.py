import json

import pytest

from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest
from kvmesh.gateway.structured import single_constraint
from kvmesh.gateway.translate import sampling_params

pytestmark = pytest.mark.unit
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def params(req: ChatCompletionRequest | CompletionRequest):  # type: ignore[no-untyped-def]
    return sampling_params(req, 8, single_constraint(req))


def test_no_constraint_leaves_the_oneof_empty() -> None:
    assert params(chat()).WhichOneof("constraint") is None
    assert params(chat(response_format={"type": "text"})).WhichOneof("constraint") is None


def test_response_format_json_object_and_json_schema() -> None:
    p = params(chat(response_format={"type": "json_object"}))
    assert p.WhichOneof("constraint") == "json_object" and p.json_object
    p = params(chat(response_format={"type": "json_schema",
                                     "json_schema": {"name": "x", "schema": SCHEMA}}))
    assert p.WhichOneof("constraint") == "json_schema"
    assert json.loads(p.json_schema) == SCHEMA


def test_vllm_extras_map_to_the_contract() -> None:
    assert json.loads(params(chat(guided_json=SCHEMA)).json_schema) == SCHEMA
    assert json.loads(params(chat(guided_json=json.dumps(SCHEMA))).json_schema) == SCHEMA
    assert params(chat(guided_regex="[0-9]+")).regex == "[0-9]+"
    assert list(params(chat(guided_choice=["yes", "no"])).choice.choices) == ["yes", "no"]
    assert params(chat(guided_grammar='root ::= "a"')).grammar == 'root ::= "a"'
    p = params(chat(structured_outputs={"choice": ["x", "y"]}))
    assert list(p.choice.choices) == ["x", "y"]
    assert json.loads(params(chat(structured_outputs={"json": SCHEMA})).json_schema) == SCHEMA
    p = params(CompletionRequest.model_validate(
        {"model": "m", "prompt": "p", "guided_regex": "a+"}))
    assert p.regex == "a+"


def test_two_constraints_are_rejected_with_param() -> None:
    with pytest.raises(InvalidRequestError, match="only one kind") as err:
        single_constraint(chat(response_format={"type": "json_object"}, guided_regex="a"))
    assert err.value.param == "guided_regex"


@pytest.mark.parametrize("kw,param", [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "[1, 2]"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
])
def test_bad_constraints_name_their_param(kw: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        single_constraint(chat(**kw))
    assert err.value.param == param
