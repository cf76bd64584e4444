"""A fast fake engine that speaks the real VllmEngine contract.

For integration tests and simulations only: it echoes the prompt's tokens back one
at a time with a fixed delay (or, with ``output="chain"``, makes each token a fixed
function of the one before it: a greedy model in miniature, whose continuation of a
prompt plus its own first tokens is exactly the rest of the uninterrupted output), so
the whole mesh can be exercised in milliseconds (routing, streaming, cancellation,
load reporting) with the same protobufs real workers use. It is never the thing that
"works" — real vLLM is.

With LoRA (an ``AdapterManager`` over :class:`FakeLoraEngine`) a request for an
adapter loads it on demand like a real worker, and echoes the prompt backwards: the
adapter visibly changes the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_servicer.load_record import HEARTBEAT_INTERVAL
from smg_grpc_servicer.tokenizer_bundle import tokenizer_bundle, tokenizer_chunks

from kvmesh.core.errors import InvalidRequestError
from kvmesh.worker.kv_heartbeat import early_heartbeat
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


def chain_token(previous: int) -> int:
    """The "chain" output's next token: a fixed function of the previous one, kept in
    ordinary (non-special) vocabulary."""
    return 200 + (previous * 7919 + 13) % 20000


#: vLLM's default ``max_logprobs``: more alternatives per token are refused.
MAX_LOGPROBS = 20
#: Choices one request may ask of the fake (vLLM bounds n by its sequence slots).
MAX_CHOICES = 64


def _check_request(request: vllm_engine_pb2.GenerateRequest, vocab_size: int | None) -> None:
    """Refuse what vLLM refuses (and what would make the fake loop for ever)."""
    if request.WhichOneof("input") != "tokenized":
        raise InvalidRequestError("fake engine takes token ids", param="tokenized")
    ids = request.tokenized.input_ids
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise InvalidRequestError(
            f"token id {max(ids)} is out of vocabulary (size {vocab_size})",
            param="tokenized.input_ids")
    params = request.sampling_params
    for name in ("logprobs", "prompt_logprobs"):
        if params.HasField(name) and not -1 <= getattr(params, name) <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"{name} must be in [-1, {MAX_LOGPROBS}], got {getattr(params, name)}",
                param=name)
    if params.n > MAX_CHOICES:
        raise InvalidRequestError(f"n must be at most {MAX_CHOICES}", param="n")


def _vocab_size(model_dir: Path) -> int | None:
    """The model's embedding rows or its tokenizer's ids (added tokens included),
    whichever is larger; None when neither file says."""
    sizes = []
    unreadable = (OSError, ValueError, KeyError, TypeError)
    with contextlib.suppress(*unreadable):
        sizes.append(int(json.loads((model_dir / "config.json").read_text())["vocab_size"]))
    with contextlib.suppress(*unreadable):
        tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [token["id"] for token in tokenizer.get("added_tokens", [])]
        sizes.append(max(ids) + 1)
    return max(sizes, default=None)


def _kv_transfer_params(request: vllm_engine_pb2.GenerateRequest) -> dict[str, object]:
    if not request.HasField("kv_transfer_params_json"):
        return {}
    try:
        kv = json.loads(request.kv_transfer_params_json)
    except ValueError as exc:
        raise InvalidRequestError(f"kv_transfer_params_json is not JSON: {exc}",
                                  param="kv_transfer_params_json") from exc
    if not isinstance(kv, dict):
        raise InvalidRequestError("kv_transfer_params_json must be a JSON object",
                                  param="kv_transfer_params_json")
    return kv


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
        output: str = "echo",
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
        self._chain = output == "chain"
        self._vocab = _vocab_size(tokenizer_dir)
        self.generated_requests = 0
        #: One event per event-stream subscriber, set when the running set changes.
        self._load_watchers: set[asyncio.Event] = set()

    def _load_changed(self) -> None:
        for changed in self._load_watchers:
            changed.set()

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
        _check_request(request, self._vocab)
        prompt = list(request.tokenized.input_ids)
        params = request.sampling_params
        max_tokens = params.max_tokens if params.HasField("max_tokens") else 16
        if len(prompt) + max_tokens > self._max_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len {self._max_len}", param="max_tokens")
        rid = request.request_id
        adapter = adapter_of(context.invocation_metadata())
        if adapter and self._adapters is None:
            raise InvalidRequestError(
                f"LoRA adapter `{adapter}` requested, but this worker serves no LoRA "
                "adapters", param="model")
        echoed = prompt[::-1] if adapter else prompt
        choices = max(params.n, 1)
        kv = _kv_transfer_params(request)
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
        self._load_changed()
        self.generated_requests += 1
        output: list[int] = []
        finish = "length"
        try:
            for i in range(max_tokens):
                if rid in self._aborted:
                    finish = "abort"
                    break
                if i >= len(prompt) and not self._chain:
                    finish = "stop"
                    break
                await asyncio.sleep(self._delay)
                token = chain_token((output or prompt)[-1]) if self._chain else echoed[i]
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
            self._load_changed()
            self._aborted.discard(rid)
            if adapter and self._adapters is not None:
                self._adapters.release(adapter)

    async def Embed(
        self, request: vllm_engine_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.EmbedResponse:
        # The fake serves a generative model; vLLM's servicer refuses Embed on one so.
        raise InvalidRequestError("This model does not support pooling")

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

    async def SubscribeKvEvents(
        self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.KvEventBatch]:
        """The fake caches nothing, so it publishes no KV event; asked for load records
        before a first batch (as the router asks), it sends what a kvmesh worker's
        stream sends before its first: its load, ``load_only`` and numbered 0, when it
        changes and every ``HEARTBEAT_INTERVAL`` (the router then follows its load
        pushed, not polled).
        Not asked, the stream stays silent, as the relay's before its first batch."""
        if not request.load_records_before_first_batch:
            await asyncio.Event().wait()
        changed = asyncio.Event()
        self._load_watchers.add(changed)
        try:
            while True:
                changed.clear()
                beat = early_heartbeat(
                    common_pb2.EngineLoad(running_requests=len(self._running)))
                if beat is not None:
                    yield beat
                # The next record when the load changes (a worker's stream brings one
                # with each batch of events its requests cause), at the latest after a
                # heartbeat's interval.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT_INTERVAL):
                        await changed.wait()
        finally:
            self._load_watchers.discard(changed)

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        zip_data, sha256 = await tokenizer_bundle(self._tokenizer_dir)
        for chunk in tokenizer_chunks(zip_data, sha256):
            yield chunk
