"""OpenAI request fields ⇄ VllmEngine protobufs (pure: no grpc calls, no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from smg_grpc_proto import vllm_engine_pb2

from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.logprobs import prompt_logprobs_to_request
from kvmesh.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    Usage,
)
from kvmesh.gateway.structured import Constraint, apply_constraint
from kvmesh.v1 import inference_pb2

#: finish reasons the engine reports that OpenAI clients understand as-is.
_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}


@dataclass(frozen=True)
class GenerationSpec:
    """Everything the pipeline needs for one generation, independent of the API."""

    model: str
    prompt_ids: list[int]
    sampling: vllm_engine_pb2.SamplingParams
    stop: tuple[str, ...]
    n: int
    max_tokens: int
    prompt_text: str = ""
    #: Preprocessed images (pixels + placeholders) for a vision-language model.
    mm_inputs: vllm_engine_pb2.MultimodalInputs | None = None
    #: The LoRA adapter of ``model`` the request runs with ('' for the base model).
    adapter: str = ""


def resolve_max_tokens(
    requested: int | None, prompt_len: int, context_len: int, default_cap: int
) -> int:
    """The completion budget, or the OpenAI-style context-length error."""
    if prompt_len >= context_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_len} tokens. However, your "
            f"prompt has {prompt_len} tokens. Please reduce the length of the messages or "
            "prompt.",
            param="messages",
        )
    room = context_len - prompt_len
    if requested is None:
        return min(default_cap, room)
    if requested > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the messages, "
            f"{requested} in the completion). Please reduce the length of the messages or "
            "completion.",
            param="max_tokens",
        )
    return requested


#: OpenAI's (and vLLM's) range for a logit bias; larger values are clamped to it.
LOGIT_BIAS_LIMIT = 100.0


def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """OpenAI ``logit_bias`` → token id → bias, as vLLM's server takes it: keys must be
    token ids in the vocabulary (else 400), biases are clamped to [-100, 100]."""
    out: dict[int, float] = {}
    bad_keys: list[str] = []
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            bad_keys.append(key)
            continue
        out[token_id] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, value))
    if bad_keys:
        raise InvalidRequestError(
            f"logit_bias keys must be token ids; these are not: {bad_keys!r}",
            param="logit_bias")
    unknown = sorted(t for t in out if not 0 <= t < vocab_size)
    if unknown:
        raise InvalidRequestError(
            f"token id(s) {unknown} in logit_bias are not in the vocabulary (size "
            f"{vocab_size})", param="logit_bias")
    return out


def sampling_params(
    req: SamplingFields, max_tokens: int, constraint: Constraint | None = None,
    vocab_size: int = 0,
) -> vllm_engine_pb2.SamplingParams:
    """OpenAI sampling fields → the worker's SamplingParams (unset stays engine default).

    ``constraint`` is the structured output the worker's vLLM must enforce;
    ``vocab_size`` bounds the token ids a ``logit_bias`` may name.
    """
    params = vllm_engine_pb2.SamplingParams(
        max_tokens=max_tokens,
        n=req.n,
        stop=req.stop_list(),
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        skip_special_tokens=True,
        spaces_between_special_tokens=True,
    )
    if req.temperature is not None:
        params.temperature = req.temperature
    if req.top_p is not None:
        params.top_p = req.top_p
    if req.top_k is not None and req.top_k > 0:
        params.top_k = req.top_k
    if req.min_p is not None:
        params.min_p = req.min_p
    if req.seed is not None:
        params.seed = req.seed
    if req.presence_penalty is not None:
        params.presence_penalty = req.presence_penalty
    if req.frequency_penalty is not None:
        params.frequency_penalty = req.frequency_penalty
    if req.repetition_penalty is not None:
        params.repetition_penalty = req.repetition_penalty
    if req.logit_bias:
        params.logit_bias.update(logit_bias(req.logit_bias, vocab_size))
    if constraint is not None:
        apply_constraint(params, constraint)
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            params.logprobs = req.top_logprobs or 0
    elif isinstance(req, CompletionRequest) and req.logprobs is not None:
        params.logprobs = req.logprobs
        if req.echo:
            # As vLLM's server: echoed prompt tokens come with their logprobs too.
            params.prompt_logprobs = prompt_logprobs_to_request(req.logprobs)
    return params


def requested_max_tokens(req: SamplingFields) -> int | None:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def finish_reason(engine_reason: str) -> str:
    return _FINISH.get(engine_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached_tokens},
    )


def sampling_fields_from_proto(
    model: str, options: inference_pb2.SamplingOptions, stream: bool
) -> dict[str, object]:
    """kvmesh.v1.SamplingOptions → the OpenAI-shaped fields (for validation reuse)."""
    fields: dict[str, object] = {"model": model, "stream": stream}
    for name in (
        "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "n",
    ):
        if options.HasField(name):
            fields[name] = getattr(options, name)
    if options.stop:
        fields["stop"] = list(options.stop)
    if options.stop_token_ids:
        fields["stop_token_ids"] = list(options.stop_token_ids)
    if options.ignore_eos:
        fields["ignore_eos"] = True
    if options.logit_bias:
        fields["logit_bias"] = {str(k): v for k, v in options.logit_bias.items()}
    return fields


def _json_field(text: str, param: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc


def structured_fields_from_proto(so: inference_pb2.StructuredOutput) -> dict[str, object]:
    """kvmesh.v1.StructuredOutput → vLLM's `structured_outputs` request field."""
    kind = so.WhichOneof("kind")
    if kind is None:
        return {}
    value: object
    if kind == "json_schema":
        value = _json_field(so.json_schema, "structured_output.json_schema")
        kind = "json"
    elif kind == "choice":
        value = list(so.choice.choices)
    else:
        value = getattr(so, kind)
    return {"structured_outputs": {kind: value}}


def _content(message: inference_pb2.ChatMessage) -> object:
    """A message's content in the OpenAI shape: text, or typed parts with images."""
    if not message.parts:
        return message.content
    return [
        {"type": "text", "text": p.text} if p.WhichOneof("part") == "text"
        else {"type": "image_url", "image_url": {"url": p.image_url}}
        for p in message.parts
    ]


def chat_fields_from_proto(request: inference_pb2.ChatRequest) -> dict[str, object]:
    """kvmesh.v1.ChatRequest → the OpenAI-shaped chat request fields."""
    fields = sampling_fields_from_proto(request.model, request.sampling, request.stream)
    messages: list[dict[str, object]] = []
    for m in request.messages:
        message: dict[str, object] = {"role": m.role, "content": _content(m)}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        messages.append(message)
    fields["messages"] = messages
    if request.tools:
        fields["tools"] = [
            {"type": "function", "function": {
                "name": t.name,
                **({"description": t.description} if t.description else {}),
                **({"parameters": _json_field(t.parameters_json, "tools.parameters_json")}
                   if t.parameters_json else {}),
            }}
            for t in request.tools
        ]
    choice = request.tool_choice.WhichOneof("choice")
    if choice == "mode":
        fields["tool_choice"] = request.tool_choice.mode
    elif choice == "function":
        fields["tool_choice"] = {"type": "function",
                                 "function": {"name": request.tool_choice.function}}
    if request.HasField("parallel_tool_calls"):
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    if request.HasField("top_logprobs"):
        fields["logprobs"] = True
        fields["top_logprobs"] = request.top_logprobs
    fields.update(structured_fields_from_proto(request.structured_output))
    return fields


def _prompt_batch(batch: inference_pb2.PromptBatch) -> list[str] | list[list[int]]:
    """kvmesh.v1.PromptBatch → the OpenAI batch shape: all texts or all token arrays."""
    kinds = {p.WhichOneof("prompt") for p in batch.prompts}
    if not batch.prompts or None in kinds:
        raise InvalidRequestError("every prompt in the batch needs text or token_ids",
                                  param="batch")
    if kinds == {"text"}:
        return [p.text for p in batch.prompts]
    if kinds == {"token_ids"}:
        return [list(p.token_ids.ids) for p in batch.prompts]
    raise InvalidRequestError("a batch mixes texts and token ids", param="batch")


def completion_fields_from_proto(request: inference_pb2.CompletionRequest) -> dict[str, object]:
    """kvmesh.v1.CompletionRequest → the OpenAI-shaped completion request fields."""
    fields = sampling_fields_from_proto(request.model, request.sampling, request.stream)
    which = request.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    if which == "batch":
        fields["prompt"] = _prompt_batch(request.batch)
    else:
        fields["prompt"] = request.text if which == "text" else list(request.token_ids.ids)
    if request.HasField("logprobs"):
        fields["logprobs"] = request.logprobs
    fields["echo"] = request.echo
    fields.update(structured_fields_from_proto(request.structured_output))
    return fields
