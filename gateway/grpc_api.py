"""kvmesh.v1.Inference: the gateway's gRPC API, over the same pipeline as HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from pydantic import ValidationError

from kvmesh.errors import InvalidRequestError, KvmeshError, http_error_for
from kvmesh.gateway.core import GatewayCore, new_request_id
from kvmesh.gateway.pipeline import Finished, run_generation
from kvmesh.gateway.request_log import RequestRecord
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest
from kvmesh.gateway.tokenizers import ModelTokenizer
from kvmesh.gateway.translate import GenerationSpec, sampling_fields_from_proto
from kvmesh.logs import request_id_var
from kvmesh.tracing import current_trace_id
from kvmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


def _validated(cls: type, fields: dict[str, object]) -> object:
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequestError(f"{param}: {first.get('msg')}", param=param) from exc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    async def _counted(
        self, method: str, model: str, stream: bool, client_id: str, prefix: str,
        prepare: Callable[[], Awaitable[tuple[GenerationSpec, ModelTokenizer]]],
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        """Metrics for one RPC: requests by gRPC status, errors by type, token timings."""
        metrics = self._core.metrics
        started = time.perf_counter()
        endpoint = f"grpc:{method}"
        status = grpc.StatusCode.OK
        record = RequestRecord(client_id or new_request_id(prefix), started,
                               trace_id=current_trace_id(), endpoint=endpoint, model=model)
        request_id_var.set(record.request_id)
        try:
            spec, tokenizer = await prepare()
            async for item in self._generate(spec, tokenizer, record.request_id, prefix,
                                             stream, endpoint, started, record):
                yield item
        except KvmeshError as exc:
            status = exc.code
            metrics.errors.labels(exc.openai_type).inc()
            raise
        except grpc.aio.AioRpcError as exc:
            status = exc.code()
            metrics.errors.labels(http_error_for(status).openai_type).inc()
            raise
        finally:
            metrics.requests.labels(metrics.model_label(model), endpoint, status.name).inc()
            record.status = status.name
            record.done()

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        async for item in self._counted(
            "Chat", request.model, request.stream, request.request_id, "chatcmpl",
            lambda: self._prepare_chat(request),
        ):
            yield item

    async def Complete(
        self, request: inference_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        async for item in self._counted(
            "Complete", request.model, request.stream, request.request_id, "cmpl",
            lambda: self._prepare_completion(request),
        ):
            yield item

    async def _prepare_chat(
        self, request: inference_pb2.ChatRequest
    ) -> tuple[GenerationSpec, ModelTokenizer]:
        fields = sampling_fields_from_proto(request.model, request.sampling, request.stream)
        fields["messages"] = [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
            for m in request.messages
        ]
        req = _validated(ChatCompletionRequest, fields)
        assert isinstance(req, ChatCompletionRequest)
        spec, tokenizer, _plan = await self._core.prepare_chat(req)
        return spec, tokenizer

    async def _prepare_completion(
        self, request: inference_pb2.CompletionRequest
    ) -> tuple[GenerationSpec, ModelTokenizer]:
        fields = sampling_fields_from_proto(request.model, request.sampling, request.stream)
        which = request.WhichOneof("prompt")
        if which is None:
            raise InvalidRequestError("prompt is required", param="prompt")
        fields["prompt"] = request.text if which == "text" else list(request.token_ids.ids)
        req = _validated(CompletionRequest, fields)
        assert isinstance(req, CompletionRequest)
        specs, tokenizer = await self._core.prepare_completion(req)
        return specs[0], tokenizer

    async def _generate(
        self, spec: GenerationSpec, tokenizer: ModelTokenizer, client_id: str, prefix: str,
        stream: bool, endpoint: str, started: float, record: RequestRecord,
    ) -> AsyncIterator[inference_pb2.GenerationResponse]:
        rid = client_id or new_request_id(prefix)
        created = int(time.time())
        choices = [inference_pb2.GenerationChoice(index=i) for i in range(spec.n)]
        events = self._core.metrics.observe_generation(
            run_generation(self._core.mesh, tokenizer, spec, rid), spec.model, endpoint, started,
            record)
        async for event in events:
            if isinstance(event, Finished):
                u = event.usage
                usage = common_pb2.Usage(
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    total_tokens=u.total_tokens,
                    cached_tokens=(u.prompt_tokens_details or {}).get("cached_tokens", 0),
                )
                yield inference_pb2.GenerationResponse(
                    id=rid, model=spec.model, created=created, usage=usage,
                    choices=[] if stream else choices,
                )
            elif stream:
                yield inference_pb2.GenerationResponse(
                    id=rid, model=spec.model, created=created,
                    choices=[inference_pb2.GenerationChoice(
                        index=event.index, text=event.text, token_ids=event.token_ids,
                        finish_reason=event.finish_reason or "",
                    )],
                )
            else:
                choice = choices[event.index]
                choice.text += event.text
                choice.token_ids.extend(event.token_ids)
                if event.finish_reason:
                    choice.finish_reason = event.finish_reason

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelCard(
                    id=e.name, owned_by="kvmesh", created=e.created,
                    max_model_len=e.max_context_length,
                )
                for e in self._core.catalog.all()
            ]
        )
