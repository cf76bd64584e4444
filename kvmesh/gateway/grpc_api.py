"""kvmesh.v1.Inference: the gateway's gRPC API, over the same pipeline as HTTP."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from pydantic import BaseModel, ValidationError

from kvmesh.core.error_map import grpc_code_for, http_error_for, http_error_of
from kvmesh.core.errors import InvalidRequestError, KvmeshError
from kvmesh.gateway.chat import collect_chat, stream_chat
from kvmesh.gateway.core import GatewayCore, new_request_id
from kvmesh.gateway.lifecycle import (
    Event,
    Prepared,
    answered,
    arrived,
    authenticate,
    embed,
    generate,
    prepare_chat,
    prepare_completion,
)
from kvmesh.gateway.logprobs import TokenLogprob
from kvmesh.gateway.pipeline import Finished
from kvmesh.gateway.request_log import RequestRecord
from kvmesh.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DeltaToolCall,
    EmbeddingRequest,
    Usage,
)
from kvmesh.gateway.tokenizers import ModelTokenizer
from kvmesh.gateway.translate import chat_fields_from_proto, completion_fields_from_proto
from kvmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", inference_pb2.ChatRequest, inference_pb2.CompletionRequest)


def _validated(cls: type[M], fields: dict[str, object]) -> M:
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequestError(f"{param}: {first.get('msg')}", param=param) from exc


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _usage(u: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_tokens=(u.prompt_tokens_details or {}).get("cached_tokens", 0),
    )


def _tool_call_delta(d: DeltaToolCall) -> inference_pb2.ToolCall:
    fn = d.function
    return inference_pb2.ToolCall(
        index=d.index, id=d.id or "", name=(fn.name if fn else None) or "",
        arguments=(fn.arguments if fn else None) or "")


def _logprobs(
    items: list[TokenLogprob], top: int | None, tokenizer: ModelTokenizer
) -> list[inference_pb2.TokenLogprob]:
    if top is None:
        return []
    return [
        inference_pb2.TokenLogprob(
            token_id=item.token_id, token=tokenizer.token_text(item.token_id),
            logprob=item.logprob,  # None (unset) for an echoed prompt's first token
            top_logprobs=[
                inference_pb2.TopLogprob(token_id=tid, token=tokenizer.token_text(tid),
                                         logprob=lp)
                for tid, lp in sorted(item.top, key=lambda t: -t[1])[:top]
            ],
        )
        for item in items
    ]


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    @contextlib.asynccontextmanager
    async def _accounted(self, method: str, model: str, record: RequestRecord | None,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[str]:
        """Authenticate the caller (yielding its key id), then count the RPC by gRPC
        status and its errors by type, and close its request log record."""
        metrics = self._core.metrics
        status = grpc.StatusCode.OK
        try:
            yield authenticate(self._core, _bearer(context))
        except KvmeshError as exc:
            status = grpc_code_for(exc)
            metrics.errors.labels(http_error_of(exc).openai_type).inc()
            raise
        except grpc.aio.AioRpcError as exc:
            status = exc.code()
            metrics.errors.labels(http_error_for(status).openai_type).inc()
            raise
        finally:
            answered(self._core, f"grpc:{method}", model, status.name, record)

    async def _counted(
        self, method: str, request: R, prefix: str, prepare: Callable[[R], Awaitable[Prepared]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        """One generation RPC through the request lifecycle, accounted."""
        record = arrived(request.request_id or new_request_id(prefix), f"grpc:{method}",
                         request.model)
        async with self._accounted(method, request.model, record, context) as key:
            prepared = await prepare(request)
            async for item in self._generate(prepared, key, record):
                yield item

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        async for item in self._counted("Chat", request, "chatcmpl", self._prepare_chat, context):
            yield item

    async def Complete(
        self, request: inference_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        async for item in self._counted("Complete", request, "cmpl", self._prepare_completion,
                                        context):
            yield item

    async def _prepare_chat(self, request: inference_pb2.ChatRequest) -> Prepared:
        req = _validated(ChatCompletionRequest, chat_fields_from_proto(request))
        return await prepare_chat(self._core, req)

    async def _prepare_completion(self, request: inference_pb2.CompletionRequest) -> Prepared:
        req = _validated(CompletionRequest, completion_fields_from_proto(request))
        return await prepare_completion(self._core, req)

    async def _generate(
        self, prepared: Prepared, key: str, record: RequestRecord,
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        rid = record.request_id
        events = generate(self._core, key, prepared, rid, record)
        async with contextlib.aclosing(events):  # a cancelled RPC frees its slot at once
            async for item in self._responses(prepared, events, rid):
                yield item

    async def _responses(
        self, prepared: Prepared, events: AsyncIterator[Event], rid: str,
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        spec, tokenizer, plan = prepared.specs[0], prepared.tokenizer, prepared.plan
        created = int(time.time())
        top = plan.top_logprobs if plan is not None else prepared.logprobs

        def response(choices: list[inference_pb2.GenerationChoice],
                     usage: common_pb2.Usage | None = None) -> inference_pb2.GenerationResponse:
            return inference_pb2.GenerationResponse(
                id=rid, model=prepared.model, created=created, choices=choices, usage=usage)

        if plan is not None and not prepared.stream:
            results, final = await collect_chat(events, plan, tokenizer, spec.n)
            yield response([
                inference_pb2.GenerationChoice(
                    index=r.index, text=r.content or "", reasoning=r.reasoning or "",
                    finish_reason=r.finish_reason or "",
                    tool_calls=[inference_pb2.ToolCall(
                        index=i, id=c.id, name=c.function.name, arguments=c.function.arguments)
                        for i, c in enumerate(r.tool_calls)],
                    logprobs=_logprobs(r.logprobs, top, tokenizer),
                )
                for r in results
            ], _usage(final))
            return
        if plan is not None:
            async for chat_event in stream_chat(events, plan, tokenizer, spec.n):
                if isinstance(chat_event, Finished):
                    yield response([], _usage(chat_event.usage))
                    continue
                yield response([inference_pb2.GenerationChoice(
                    index=chat_event.index, text=chat_event.content or "",
                    reasoning=chat_event.reasoning or "",
                    finish_reason=chat_event.finish_reason or "",
                    tool_calls=[_tool_call_delta(d) for d in chat_event.tool_calls],
                    logprobs=_logprobs(chat_event.logprobs, top, tokenizer),
                )])
            return
        # Prompt i's choice j is choice i*n+j.
        choices = [inference_pb2.GenerationChoice(index=i, text=prepared.echoes[i // spec.n])
                   for i in range(spec.n * len(prepared.specs))]
        echoed: set[int] = set()
        async for event in events:
            if isinstance(event, Finished):
                yield response([] if prepared.stream else choices, _usage(event.usage))
            elif prepared.stream:
                text = event.text
                echo = prepared.echoes[event.index // spec.n]
                if echo and event.index not in echoed:
                    echoed.add(event.index)
                    text = echo + text
                yield response([inference_pb2.GenerationChoice(
                    index=event.index, text=text, token_ids=event.token_ids,
                    finish_reason=event.finish_reason or "",
                    logprobs=_logprobs([*event.prompt_logprobs, *event.logprobs], top,
                                       tokenizer),
                )])
            else:
                choice = choices[event.index]
                choice.text += event.text
                choice.token_ids.extend(event.token_ids)
                choice.logprobs.extend(_logprobs([*event.prompt_logprobs, *event.logprobs],
                                                 top, tokenizer))
                if event.finish_reason:
                    choice.finish_reason = event.finish_reason

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelCard(
                    id=name, owned_by="kvmesh", created=e.created,
                    max_model_len=e.max_context_length, parent=parent,
                )
                for name, parent, e in self._core.catalog.cards()
            ]
        )

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        async with self._accounted("Embed", request.model, None, context) as key:
            return await self._embed(request, key)

    async def _embed(self, request: inference_pb2.EmbedRequest,
                     key: str) -> inference_pb2.EmbedResponse:
        inputs: list[object] = []
        for item in request.inputs:
            which = item.WhichOneof("input")
            if which is None:
                raise InvalidRequestError("every input needs text or token_ids", param="inputs")
            inputs.append(item.text if which == "text" else list(item.token_ids.ids))
        if not inputs:
            raise InvalidRequestError("inputs must not be empty", param="inputs")
        if all(isinstance(i, str) for i in inputs) or all(isinstance(i, list) for i in inputs):
            value: object = inputs
        else:
            raise InvalidRequestError("inputs mix texts and token ids", param="inputs")
        fields: dict[str, object] = {"model": request.model, "input": value}
        if request.HasField("dimensions"):
            fields["dimensions"] = request.dimensions
        req = _validated(EmbeddingRequest, fields)
        rid = request.request_id or new_request_id("embd")
        result = await embed(self._core, key, req, rid)
        return inference_pb2.EmbedResponse(
            id=rid, model=req.model, created=int(time.time()),
            data=[
                inference_pb2.Embedding(index=i, values=v.tolist())
                for i, v in enumerate(result.vectors)
            ],
            usage=common_pb2.Usage(
                prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens
            ),
        )
