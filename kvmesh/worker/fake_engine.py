"""A fast fake engine that speaks the real VllmEngine contract.

For integration tests and simulations only: it echoes the prompt's tokens back one
at a time with a fixed delay, so the whole mesh can be exercised in milliseconds
(routing, streaming, cancellation, load reporting) with the same protobufs real
workers use. It is never the thing that "works" — real vLLM is.

With LoRA (an ``AdapterManager`` over :class:`FakeLoraEngine`) a request for an
adapter loads it on demand like a real worker, and echoes the prompt backwards: the
adapter visibly changes the output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_servicer.tokenizer_bundle import tokenizer_bundle, tokenizer_chunks

from kvmesh.core.errors import InvalidRequestError
from kvmesh.worker.lora import AdapterManager, adapter_of

log = logging.getLogger(__name__)


class FakeLoraEngine:
    """The fake engine's adapter store: reads adapter_config.json like vLLM does
    (a broken one fails the load) and takes ``load_delay_s`` per load."""

    def __init__(self, load_delay_s: float = 0.0) -> None:
        self._delay = load_delay_s
        self.loaded: dict[int, Path] = {}

    async def add_lora(self, name: str, lora_id: int, path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        if not isinstance(config, dict) or "r" not in config:
            raise ValueError(f"{path}/adapter_config.json has no rank 'r'")
        await asyncio.sleep(self._delay)
        self.loaded[lora_id] = path

    async def remove_lora(self, lora_id: int) -> None:
        self.loaded.pop(lora_id, None)


def _fake_top(token: int, value: float, top_n: int) -> vllm_engine_pb2.TopLogProbs:
    # Like vLLM's servicer: the map starts with the token itself, cut to top_n entries.
    # The alternatives are all likelier than the token, so it is never among the top.
    others = range(1, top_n)
    return vllm_engine_pb2.TopLogProbs(token_ids=[token, *(token + j for j in others)],
                                       values=[value, *(-0.01 * j for j in others)])


def fake_prompt_logprobs(prompt: list[int], top_n: int) -> vllm_engine_pb2.InputLogProbs:
    """Deterministic prompt logprobs in the servicer's shape (the first token's value
    unset); position i's logprob is ``-1 - i % 4 / 4``."""
    lp = vllm_engine_pb2.InputLogProbs(token_ids=prompt)
    for i, token in enumerate(prompt):
        if i == 0:
            lp.token_logprobs.add()
            lp.top_logprobs.add()
            continue
        value = -1 - (i % 4) / 4
        lp.token_logprobs.add(value=value)
        lp.top_logprobs.append(_fake_top(token, value, top_n))
    return lp


def fake_output_logprobs(tokens: list[int], top_n: int) -> vllm_engine_pb2.OutputLogProbs:
    """Every generated token at logprob -1, in the servicer's shape."""
    return vllm_engine_pb2.OutputLogProbs(
        token_ids=tokens, token_logprobs=[-1.0] * len(tokens),
        top_logprobs=[_fake_top(t, -1.0, top_n) for t in tokens] if top_n else [])


class FakeVllmEngineServicer(vllm_engine_pb2_grpc.VllmEngineServicer):
    def __init__(
        self,
        served_model_name: str,
        tokenizer_dir: Path,
        *,
        token_delay_s: float = 0.005,
        max_context_length: int = 4096,
        block_size: int = 32,
        kv_capacity_tokens: int = 65536,
        side_channel: str = "",
        adapters: AdapterManager | None = None,
    ) -> None:
        self._name = served_model_name
        self._adapters = adapters
        self._tokenizer_dir = tokenizer_dir
        self._delay = token_delay_s
        self._max_len = max_context_length
        self._block_size = block_size
        self._capacity = kv_capacity_tokens
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        self._start = time.time()
        self._side_channel = side_channel
        self.generated_requests = 0

    def _handoff(self, rid: str, prompt: list[int]) -> str:
        """What a NIXL prefill worker returns for the decode worker (same keys)."""
        host, _, port = self._side_channel.rpartition(":")
        blocks = len(prompt) // self._block_size
        return json.dumps({
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_block_ids": [list(range(blocks))], "remote_engine_id": self._name,
            "remote_request_id": rid, "remote_host": host, "remote_port": int(port or 0),
            "remote_num_tokens": len(prompt),
        })

    async def Generate(
        self, request: vllm_engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vllm_engine_pb2.GenerateResponse]:
        if request.WhichOneof("input") != "tokenized":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake engine takes token ids")
        prompt = list(request.tokenized.input_ids)
        params = request.sampling_params
        max_tokens = params.max_tokens if params.HasField("max_tokens") else 16
        if len(prompt) + max_tokens > self._max_len:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len {self._max_len}",
            )
        rid = request.request_id
        adapter = adapter_of(context.invocation_metadata())
        if adapter and self._adapters is None:
            raise InvalidRequestError(
                f"LoRA adapter `{adapter}` requested, but this worker serves no LoRA "
                "adapters", param="model")
        echoed = prompt[::-1] if adapter else prompt
        choices = max(params.n, 1)
        kv = json.loads(request.kv_transfer_params_json) \
            if request.HasField("kv_transfer_params_json") else {}
        handing_over = bool(kv.get("do_remote_decode")) and bool(self._side_channel)
        # A decode worker given a hand-over "loads" the prompt's full blocks.
        cached = len(prompt) - len(prompt) % self._block_size \
            if kv.get("do_remote_prefill") else 0
        prompt_logprobs = (fake_prompt_logprobs(prompt, params.prompt_logprobs)
                           if params.HasField("prompt_logprobs") else None)
        top_n = params.logprobs if params.HasField("logprobs") else None
        if adapter and self._adapters is not None:  # released in the finally below
            await self._adapters.acquire(adapter)
        self._running.add(rid)
        self.generated_requests += 1
        output: list[int] = []
        finish = "length"
        try:
            for i in range(max_tokens):
                if rid in self._aborted:
                    finish = "abort"
                    break
                if i >= len(prompt):
                    finish = "stop"
                    break
                await asyncio.sleep(self._delay)
                token = echoed[i]
                output.append(token)
                if request.stream:
                    # Every one of the n choices echoes the same tokens (index per choice).
                    for index in range(choices):
                        yield vllm_engine_pb2.GenerateResponse(
                            chunk=vllm_engine_pb2.GenerateStreamChunk(
                                token_ids=[token], prompt_tokens=len(prompt),
                                completion_tokens=1, cached_tokens=cached, index=index,
                                # Like vLLM's servicer: in each choice's first chunk.
                                input_logprobs=prompt_logprobs if i == 0 else None,
                                output_logprobs=None if top_n is None
                                else fake_output_logprobs([token], top_n),
                            )
                        )
            for index in range(choices):
                yield vllm_engine_pb2.GenerateResponse(
                    complete=vllm_engine_pb2.GenerateComplete(
                        # Like vLLM's servicer: a streamed Complete carries the last delta
                        # (already sent), a non-streamed one everything.
                        output_ids=output[-1:] if request.stream else output,
                        finish_reason=finish,
                        prompt_tokens=len(prompt),
                        completion_tokens=len(output),
                        cached_tokens=cached,
                        input_logprobs=None if request.stream else prompt_logprobs,
                        output_logprobs=None if top_n is None or request.stream
                        else fake_output_logprobs(output, top_n),
                        kv_transfer_params_json=(
                            self._handoff(rid, prompt) if handing_over else None),
                        index=index,
                    )
                )
        finally:
            self._running.discard(rid)
            self._aborted.discard(rid)
            if adapter and self._adapters is not None:
                self._adapters.release(adapter)

    async def Embed(
        self, request: vllm_engine_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.EmbedResponse:
        # The fake serves a generative model; vLLM's servicer refuses Embed on one so.
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "This model does not support pooling")
        raise AssertionError("abort raises")

    async def Abort(
        self, request: vllm_engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.AbortResponse:
        self._aborted.update(r for r in request.request_ids if r in self._running)
        return vllm_engine_pb2.AbortResponse()

    async def HealthCheck(
        self, request: vllm_engine_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.HealthCheckResponse:
        return vllm_engine_pb2.HealthCheckResponse(healthy=True, message="fake engine")

    async def GetModelInfo(
        self, request: vllm_engine_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.GetModelInfoResponse:
        return vllm_engine_pb2.GetModelInfoResponse(
            model_path=str(self._tokenizer_dir),
            is_generation=True,
            max_context_length=self._max_len,
            served_model_name=self._name,
            tokenizer_path=str(self._tokenizer_dir),
            max_req_input_len=self._max_len,
        )

    async def GetServerInfo(
        self, request: vllm_engine_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.GetServerInfoResponse:
        return vllm_engine_pb2.GetServerInfoResponse(
            active_requests=len(self._running),
            uptime_seconds=time.time() - self._start,
            server_type="kvmesh-fake",
            block_size=self._block_size,
        )

    async def GetLoads(
        self, request: vllm_engine_pb2.GetLoadsRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.GetLoadsResponse:
        load = vllm_engine_pb2.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=len(self._running),
            num_total_reqs=len(self._running),
            max_total_num_tokens=self._capacity,
        )
        return vllm_engine_pb2.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version="fake",
            dp_rank_count=1,
            loads=[load],
        )

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        zip_data, sha256 = await tokenizer_bundle(self._tokenizer_dir)
        for chunk in tokenizer_chunks(zip_data, sha256):
            yield chunk
