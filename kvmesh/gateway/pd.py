"""Prefill/decode hand-over requests (the seed's PDProxyServer role), pure.

A disaggregated request runs twice: on the prefill worker with one output token and
``do_remote_decode`` (vLLM finishes it there and keeps its KV blocks for the decode
worker), then on the decode worker with the ``kv_transfer_params`` the prefill
returned, verbatim (the decode worker pulls the KV over NIXL and samples the first
token itself). The client sees only the decode stream: the prefill's one token is
dropped, so the first token is neither duplicated nor lost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter
from smg_grpc_proto import vllm_engine_pb2

#: What the prefill leg asks of vLLM's connector (as vLLM's own P/D proxy sends it).
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_request_id(request_id: str) -> str:
    return f"{request_id}-prefill"


def prefill_request(
    request_id: str,
    prompt_ids: Sequence[int],
    prompt_text: str,
    sampling: vllm_engine_pb2.SamplingParams,
    mm_inputs: vllm_engine_pb2.MultimodalInputs | None = None,
) -> vllm_engine_pb2.GenerateRequest:
    """The prefill leg: the same prompt and sampling, one token, one choice."""
    params = vllm_engine_pb2.SamplingParams()
    params.CopyFrom(sampling)
    params.max_tokens = 1
    params.min_tokens = 0
    params.n = 1
    params.ClearField("logprobs")
    params.ClearField("prompt_logprobs")
    return vllm_engine_pb2.GenerateRequest(
        request_id=prefill_request_id(request_id),
        tokenized=vllm_engine_pb2.TokenizedInput(input_ids=prompt_ids, original_text=prompt_text),
        sampling_params=params,
        stream=False,
        kv_transfer_params_json=json.dumps(PREFILL_KV_PARAMS),
        mm_inputs=mm_inputs,
    )


def generate_request(
    request_id: str,
    prompt_ids: Sequence[int],
    prompt_text: str,
    sampling: vllm_engine_pb2.SamplingParams,
    kv_transfer_params_json: str | None = None,
    mm_inputs: vllm_engine_pb2.MultimodalInputs | None = None,
) -> vllm_engine_pb2.GenerateRequest:
    """A whole request, or the decode leg when the prefill's hand-over is given."""
    request = vllm_engine_pb2.GenerateRequest(
        request_id=request_id,
        tokenized=vllm_engine_pb2.TokenizedInput(input_ids=prompt_ids, original_text=prompt_text),
        sampling_params=sampling,
        stream=True,
        mm_inputs=mm_inputs,
    )
    if kv_transfer_params_json is not None:
        request.kv_transfer_params_json = kv_transfer_params_json
    return request


def pd_fallback_reason(sampling: vllm_engine_pb2.SamplingParams) -> str | None:
    """Why a request must prefill on its decode worker instead, or None.

    n > 1: vLLM hands one request's KV to one request, and n choices fork after it.
    Prompt logprobs: vLLM never reads cached KV for them (it skips the connector's
    hand-over too), so the decode worker would compute the prompt anyway while the
    prefill worker held its blocks for nothing until NIXL's lease ran out.
    """
    if sampling.n > 1:
        return "multiple_choices"
    if sampling.HasField("prompt_logprobs"):
        return "prompt_logprobs"
    return None


def handoff(response: vllm_engine_pb2.GenerateResponse) -> str | None:
    """The decode worker's ``kv_transfer_params_json`` from the prefill's Complete,
    or None when the prefill worker handed nothing over (no connector, or the
    connector kept nothing)."""
    if response.WhichOneof("response") != "complete":
        return None
    complete = response.complete
    if not complete.HasField("kv_transfer_params_json"):
        return None
    try:
        params = json.loads(complete.kv_transfer_params_json)
    except json.JSONDecodeError:
        return None
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return None
    return complete.kv_transfer_params_json


class PdMetrics:
    """How requests ran, and every fall-back to a local prefill (never a hung request)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "kvmesh_gateway_pd_requests", "Generations by mode the router chose",
            ["mode"], registry=r)
        self.fallbacks = Counter(
            "kvmesh_gateway_pd_fallbacks",
            "Disaggregated requests that prefilled on the decode worker instead "
            "(prefill_failed, prefill_timeout, no_handoff, multiple_choices, "
            "prompt_logprobs)",
            ["reason"], registry=r)
        self.prefill_seconds = Counter(
            "kvmesh_gateway_pd_prefill_seconds",
            "Time spent in prefill legs (until the hand-over was received)", registry=r)
