"""Resuming a generation on another worker after its worker died mid-stream (pure).

The client has already received some tokens. The gateway sends the rest of the work
to another worker as a *continuation*: the prompt followed by the tokens already sent,
with the same sampling settings and ``max_tokens`` (and ``min_tokens``) reduced by what
was sent. The new worker's stream is spliced onto the old one: its tokens follow the
last one sent, so none is repeated or lost, and its usage is reported as the original
request's (prompt tokens of the original prompt; completion tokens are counted by the
gateway as they pass).

Greedy decoding continues exactly as the uninterrupted run would (the continuation's
context is the same token sequence). Sampled decoding continues with the same
distribution; the ``seed`` is passed on unchanged, so a seeded request is reproducible
up to the failover and a valid sample after it, not the same sample as an
uninterrupted run (vLLM seeds a request's generator when the request starts).

What cannot be resumed (the stream then ends with an ``unavailable`` error):
- ``n`` > 1: the choices share one engine request; their continuations would differ.
- structured output (JSON schema, regex, grammar, choice): the engine's grammar state
  would start again at the beginning of the sent text's continuation.
- ``presence_penalty``/``frequency_penalty``: vLLM counts them over output tokens
  only; the sent tokens would become prompt tokens and stop counting.
- ``truncate_prompt_tokens``: the continuation's prompt would be cut differently.
Output logprobs resume (the continuation's values are the same model's for the same
context); prompt logprobs were sent with the first token, so the continuation asks
for none.
"""

from __future__ import annotations

from collections.abc import Sequence

from smg_grpc_proto import vllm_engine_pb2


def resume_refusal(sampling: vllm_engine_pb2.SamplingParams) -> str | None:
    """Why a generation with these settings cannot be resumed, or None."""
    if sampling.n > 1:
        return f"n={sampling.n} choices share one engine request"
    if sampling.WhichOneof("constraint") is not None:
        return "structured output restarts its grammar on a continuation"
    if sampling.presence_penalty or sampling.frequency_penalty:
        return "presence/frequency penalties count only the new worker's output"
    if sampling.HasField("truncate_prompt_tokens"):
        return "truncate_prompt_tokens would cut the continuation's prompt differently"
    return None


def continuation(
    prompt_ids: Sequence[int], sent: Sequence[int], sampling: vllm_engine_pb2.SamplingParams
) -> tuple[list[int], vllm_engine_pb2.SamplingParams]:
    """The prompt and sampling settings that generate the rest of a stream."""
    params = vllm_engine_pb2.SamplingParams()
    params.CopyFrom(sampling)
    if sampling.HasField("max_tokens"):
        params.max_tokens = max(sampling.max_tokens - len(sent), 0)
    params.min_tokens = max(sampling.min_tokens - len(sent), 0)
    params.ClearField("prompt_logprobs")
    return [*prompt_ids, *sent], params


def budget_spent(sent: int, sampling: vllm_engine_pb2.SamplingParams) -> bool:
    """Every token asked for was sent (the worker died before saying it was done)."""
    return sampling.HasField("max_tokens") and sent >= sampling.max_tokens


def length_complete(prompt_tokens: int, sent: int) -> vllm_engine_pb2.GenerateResponse:
    """The Complete a worker that died after its last token never sent."""
    return vllm_engine_pb2.GenerateResponse(complete=vllm_engine_pb2.GenerateComplete(
        finish_reason="length", prompt_tokens=prompt_tokens, completion_tokens=sent, index=0))


def as_original(response: vllm_engine_pb2.GenerateResponse, prompt_tokens: int,
                sent_before: int) -> vllm_engine_pb2.GenerateResponse:
    """A continuation's message as the original request's: its prompt is the original
    prompt (the sent tokens were completion tokens), its cached tokens at most that."""
    kind = response.WhichOneof("response")
    if kind == "chunk":
        msg: vllm_engine_pb2.GenerateStreamChunk | vllm_engine_pb2.GenerateComplete = (
            response.chunk)
    elif kind == "complete":
        msg = response.complete
    else:
        return response
    msg.prompt_tokens = prompt_tokens
    msg.cached_tokens = min(msg.cached_tokens, prompt_tokens)
    if kind == "complete":
        msg.completion_tokens += sent_before
    return response
