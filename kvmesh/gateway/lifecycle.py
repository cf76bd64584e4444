"""One request's life in the gateway, the same behind the HTTP and the gRPC door:

    arrive (request id, trace id, log record: ``arrived``) → authenticate (the key,
    refusals counted: ``authenticate``) → prepare (validate, chat template, tokenize) →
    admit (a slot under the gateway's limits) → run (route + generate on the mesh, or
    embed) → observe (token timings, usage, the request log) → answer (the request
    counted by status, its log record closed: ``answered``) → release (the slot, however
    the request ends)

The doors only translate: they parse their wire format into the OpenAI request models,
call ``prepare_chat``/``prepare_completion`` then ``generate`` (or ``embed``), and
render the events; they say when a request arrived and how it was answered, in their
own status words (an HTTP status code, a gRPC status name). Cancellation is the doors'
too, because only they can see a client leave: HTTP watches for the disconnect, gRPC
cancels the handler; either way the event stream below is closed, which cancels the
worker RPC (vLLM aborts) and releases the slot.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvmesh.core.errors import AuthenticationError
from kvmesh.core.logs import request_id_var
from kvmesh.core.tracing import current_trace_id
from kvmesh.gateway.admission import Slot
from kvmesh.gateway.chat import ChatPlan
from kvmesh.gateway.core import EmbeddingResult, GatewayCore
from kvmesh.gateway.pipeline import ChoiceDelta, Finished, echo_texts, run_prompts
from kvmesh.gateway.request_log import RequestRecord
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from kvmesh.gateway.tokenizers import ModelTokenizer
from kvmesh.gateway.translate import GenerationSpec

Event = ChoiceDelta | Finished


@dataclass
class Prepared:
    """A validated, tokenized request, ready to generate."""

    model: str
    specs: list[GenerationSpec]
    tokenizer: ModelTokenizer
    stream: bool
    plan: ChatPlan | None = None  # chat only
    echoes: list[str] = field(default_factory=list)  # completions: echo text per prompt
    logprobs: int | None = None  # completions: alternatives per token, when requested

    @property
    def n(self) -> int:
        """Choices per prompt (choice i*n+j is prompt i's j-th)."""
        return self.specs[0].n


async def prepare_chat(core: GatewayCore, req: ChatCompletionRequest) -> Prepared:
    spec, tokenizer, plan = await core.prepare_chat(req)
    return Prepared(req.model, [spec], tokenizer, req.stream, plan=plan)


async def prepare_completion(core: GatewayCore, req: CompletionRequest) -> Prepared:
    specs, tokenizer = await core.prepare_completion(req)
    echoes = echo_texts(specs, tokenizer) if req.echo else [""] * len(specs)
    return Prepared(req.model, specs, tokenizer, req.stream, echoes=echoes,
                    logprobs=req.logprobs)


def arrived(request_id: str, endpoint: str = "", model: str = "") -> RequestRecord:
    """A request has arrived: its log record (timed from now, with the trace it belongs
    to), and its id on every log line written while it is served."""
    request_id_var.set(request_id)
    return RequestRecord(request_id, time.perf_counter(), trace_id=current_trace_id(),
                         endpoint=endpoint, model=model)


def authenticate(core: GatewayCore, bearer: str | None) -> str:
    """The caller's key id (``bearer``: the ``authorization`` header or metadata); a
    refused one is counted by why (no credential, or a wrong one) before it is raised."""
    try:
        return core.admission.authenticate(bearer)
    except AuthenticationError:
        core.metrics.auth_failure("missing_key" if bearer is None else "invalid_key")
        raise


def answered(core: GatewayCore, endpoint: str, model: str, status: int | str,
             record: RequestRecord | None) -> None:
    """The door has answered: count the request by model, endpoint and ``status``, and
    close its log record (whose line still waits for a streaming generation to end)."""
    metrics = core.metrics
    metrics.requests.labels(metrics.model_label(model), endpoint, str(status)).inc()
    if record is not None:
        record.endpoint, record.model, record.status = endpoint, model, status
        record.done()


def generate(core: GatewayCore, key: str, prepared: Prepared, request_id: str,
             record: RequestRecord) -> Releasing:
    """Admit the request (or raise the 429 of the gateway's limits) and stream its
    events, observed into the metrics and ``record`` (timed from its arrival, labelled
    by its endpoint); the slot is released when the events end, fail or are closed."""
    slot = core.admission.admit(key, prepared.stream)
    events = core.metrics.observe_generation(
        run_prompts(core.mesh, prepared.tokenizer, prepared.specs, request_id),
        prepared.model, record.endpoint, record.started, record)
    return Releasing(slot, events)


async def embed(core: GatewayCore, key: str, req: EmbeddingRequest,
                request_id: str) -> EmbeddingResult:
    """Embeddings under the same limits as generations (one non-streaming slot)."""
    slot = core.admission.admit(key, stream=False)
    try:
        return await core.embed(req, request_id)
    finally:
        slot.release()


class Releasing(AsyncIterator[Event]):
    """Events that give back their admission slot however they end: exhausted, failed,
    cancelled, or closed before the first one was read (which an async generator's
    ``finally`` would miss)."""

    def __init__(self, slot: Slot, events: AsyncIterator[Event]) -> None:
        self._slot = slot
        self._events = events

    def __aiter__(self) -> Releasing:
        return self

    async def __anext__(self) -> Event:
        try:
            return await anext(self._events)
        except BaseException:  # StopAsyncIteration too: the stream ended
            self._slot.release()
            raise

    async def aclose(self) -> None:
        self._slot.release()
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()
