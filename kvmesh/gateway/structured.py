"""Structured-output requests → the worker's SamplingParams constraint (pure).

The gateway only chooses and checks the constraint; vLLM on the worker compiles the
grammar and enforces it token by token (``SamplingParams.constraint`` of the
``VllmEngine`` contract, mapped onto vLLM's ``StructuredOutputsParams`` by the servicer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from smg_grpc_proto import vllm_engine_pb2

from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.schemas import SamplingFields


@dataclass(frozen=True)
class Constraint:
    """One structured-output constraint: the contract's oneof field and its value."""

    kind: str  # json_schema | regex | grammar | choice | json_object | structural_tag
    value: str | bool | list[str]
    param: str  # the request field it came from (for error messages)


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
    else:
        parsed = schema
    if not isinstance(parsed, dict | bool):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    return json.dumps(parsed, separators=(",", ":"))


def _choices(choices: list[str], param: str) -> list[str]:
    if not choices:
        raise InvalidRequestError(f"{param} must list at least one choice", param=param)
    return list(choices)


def requested_constraints(req: SamplingFields) -> list[Constraint]:
    """Every constraint the request asks for, in the order vLLM documents them."""
    found: list[Constraint] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(Constraint("json_object", True, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise InvalidRequestError(
                "response_format.json_schema.schema is required when type is json_schema",
                param="response_format.json_schema",
            )
        found.append(Constraint(
            "json_schema",
            _schema_text(rf.json_schema.json_schema, "response_format.json_schema.schema"),
            "response_format",
        ))
    so = req.structured_outputs
    asked: list[tuple[str, Any, str]] = [] if so is None else [
        ("json_schema", so.json_, "structured_outputs.json"),
        ("regex", so.regex, "structured_outputs.regex"),
        ("choice", so.choice, "structured_outputs.choice"),
        ("grammar", so.grammar, "structured_outputs.grammar"),
        ("json_object", True if so.json_object else None, "structured_outputs.json_object"),
        ("structural_tag", so.structural_tag, "structured_outputs.structural_tag"),
    ]
    # vLLM's older per-field extras.
    asked += [("json_schema", req.guided_json, "guided_json"),
              ("regex", req.guided_regex, "guided_regex"),
              ("choice", req.guided_choice, "guided_choice"),
              ("grammar", req.guided_grammar, "guided_grammar")]
    for kind, value, param in asked:
        if value is None:
            continue
        if kind == "json_schema":
            value = _schema_text(value, param)
        elif kind == "choice":
            value = _choices(value, param)
        found.append(Constraint(kind, value, param))
    return found


def single_constraint(req: SamplingFields) -> Constraint | None:
    """The request's one constraint; asking for two at once is a 400 (vLLM agrees)."""
    found = requested_constraints(req)
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise InvalidRequestError(
            f"only one kind of structured output may be requested at a time (got {names})",
            param=found[1].param,
        )
    return found[0] if found else None


def apply_constraint(params: vllm_engine_pb2.SamplingParams, constraint: Constraint) -> None:
    """Set the contract's ``constraint`` oneof from ``constraint``."""
    if constraint.kind == "choice":
        assert isinstance(constraint.value, list)
        params.choice.CopyFrom(vllm_engine_pb2.ChoiceConstraint(choices=constraint.value))
    elif constraint.kind == "json_object":
        params.json_object = True
    else:
        setattr(params, constraint.kind, constraint.value)
