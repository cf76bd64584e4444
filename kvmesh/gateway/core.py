"""The gateway's state and request preparation, shared by the HTTP and gRPC APIs."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry import trace

from kvmesh.core.config import GatewayConfig
from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.adapters import AdapterAdmin
from kvmesh.gateway.admission import Admission
from kvmesh.gateway.catalog import ModelCatalog, ModelEntry, follow
from kvmesh.gateway.chat import ChatPlan
from kvmesh.gateway.embeddings import (
    EmbeddingModelInfo,
    check_dimensions,
    check_input_length,
    check_token_ids,
    shape_embedding,
    split_inputs,
)
from kvmesh.gateway.mesh import MeshClient
from kvmesh.gateway.metrics import GatewayMetrics, activate
from kvmesh.gateway.parsers import load_parsers
from kvmesh.gateway.router_client import RouterClient
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from kvmesh.gateway.structured import Constraint, single_constraint
from kvmesh.gateway.tokenizers import ModelTokenizer, TokenizerStore
from kvmesh.gateway.tools import template_message, template_tools, tool_constraint, tool_mode
from kvmesh.gateway.translate import (
    GenerationSpec,
    requested_max_tokens,
    resolve_max_tokens,
    sampling_params,
)
from kvmesh.gateway.vision import image_bytes, multimodal_inputs, open_image
from kvmesh.v1 import common_pb2

tracer = trace.get_tracer(__name__)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class EmbeddingResult:
    """Vectors in input order, and the prompt tokens they took."""

    vectors: list[np.ndarray]
    prompt_tokens: int


class GatewayCore:
    def __init__(self, config: GatewayConfig, cache_dir: Path | None = None) -> None:
        self.config = config
        # A Route call may wait at the router for a worker slot (router admission).
        route_s = config.route_timeout_s + config.route_queue_timeout_s
        self.catalog = ModelCatalog()
        routers = RouterClient(config.router_addresses(), route_s,
                               config.failover.router_retry_s,
                               lambda: (self.catalog.workers, self.catalog.unreachable))
        self.mesh = MeshClient(routers, config.request_timeout_s, config.prefill_timeout_s,
                               failover=config.failover, outlier=config.outlier)
        self.adapters = AdapterAdmin(self.mesh, self.catalog, config.request_timeout_s)
        self.metrics = GatewayMetrics(known_models=self.catalog.model_ids)
        self.metrics.serve_also(self.mesh.pd_metrics.registry)
        self.metrics.serve_also(self.mesh.metrics.registry)
        activate(self.metrics)
        self.tokenizers = TokenizerStore(
            cache_dir or Path(tempfile.gettempdir()) / "kvmesh-tokenizers"
        )
        self.admission = Admission(
            config.api_keys, config.max_concurrent_requests, config.max_streams_per_key,
            config.retry_after_s,
        )
        self._watch: asyncio.Task[None] | None = None
        #: Adapter catch-ups of joining workers under way.
        self._background: set[asyncio.Task[None]] = set()
        #: host:port of the HTTP API once bound (the gateway's own /metrics target).
        self.http_address = ""
        #: Set when the gateway drains (SIGTERM): /health answers 503.
        self.draining = False

    async def start(self) -> None:
        self._watch = asyncio.create_task(
            self.mesh.routers.watch(follow(self.catalog, self._on_new_model,
                                           self.tokenizers.forget, self._on_joined)))

    def _on_joined(self, workers: list[common_pb2.WorkerInfo]) -> None:
        if any(w.lora_slots for w in workers):
            task = asyncio.create_task(self.adapters.catch_up(workers, self.catalog.workers))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_new_model(self, entry: ModelEntry) -> None:
        self.tokenizers.prefetch(entry.name, entry.endpoints)

    async def stop(self) -> None:
        for task in [*([self._watch] if self._watch else []), *self._background]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.mesh.close()

    def ready_models(self) -> list[str]:
        return [e.name for e in self.catalog.all() if self.tokenizers.ready(e.name)]

    async def tokenizer(self, model: str) -> tuple[ModelEntry, ModelTokenizer]:
        """The served model ``model`` names (itself, or the base of the LoRA adapter it
        names) and its tokenizer: an adapter uses its base model's."""
        entry = self.catalog.resolve(model).entry
        return entry, await self.tokenizers.get(entry.name, entry.endpoints)

    def _spec(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        entry: ModelEntry,
        prompt_ids: list[int],
        prompt_text: str,
        constraint: Constraint | None,
        vocab_size: int,
    ) -> GenerationSpec:
        limit = self.config.max_prompt_tokens
        if limit is not None and len(prompt_ids) > limit:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                f"{limit}", param="messages" if isinstance(req, ChatCompletionRequest)
                else "prompt",
            )
        max_tokens = resolve_max_tokens(
            requested_max_tokens(req),
            len(prompt_ids),
            entry.max_context_length,
            self.config.default_max_tokens,
        )
        return GenerationSpec(
            model=entry.name,
            adapter=self.catalog.resolve(req.model).adapter,
            prompt_ids=prompt_ids,
            sampling=sampling_params(req, max_tokens, constraint, vocab_size),
            stop=tuple(req.stop_list()),
            n=req.n,
            max_tokens=max_tokens,
            prompt_text=prompt_text,
        )

    def chat_plan(self, req: ChatCompletionRequest) -> ChatPlan:
        parsers = self.config.parsers_for(self.catalog.resolve(req.model).entry.name)
        return ChatPlan(
            req=req,
            tool_mode=tool_mode(req),
            tool_parser=parsers.tool_call_parser,
            reasoning_parser=parsers.reasoning_parser,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )

    async def prepare_chat(
        self, req: ChatCompletionRequest
    ) -> tuple[GenerationSpec, ModelTokenizer, ChatPlan]:
        """Render the chat template and tokenize once; token ids cross the mesh."""
        entry, tokenizer = await self.tokenizer(req.model)
        plan = self.chat_plan(req)
        # A required/named tool choice is guaranteed by its schema; it wins over any
        # response_format, as in vLLM.
        constraint = tool_constraint(req) or single_constraint(req)
        if plan.needs_parser or plan.streams_required_calls:
            await load_parsers(
                plan.tool_parser if plan.tool_mode == "auto" else None, plan.reasoning_parser,
                required_calls=plan.streams_required_calls,
            )
        messages = [template_message(m) for m in req.messages]
        tools = template_tools(req)
        if any(m.image_urls() for m in req.messages):
            spec = await self._prepare_vision_chat(req, entry, tokenizer, messages, tools,
                                                   constraint)
            return spec, tokenizer, plan
        with tracer.start_as_current_span("tokenize") as span:
            # One trip to a thread for both (each trip waits for a thread and then
            # for the loop again: a scheduling delay on a busy host, paid per request).
            text, ids = await asyncio.to_thread(
                tokenizer.render_and_encode, messages, req.add_generation_prompt, tools
            )
            span.set_attribute("kvmesh.prompt_tokens", len(ids))
        spec = self._spec(req, entry, ids, text, constraint, tokenizer.vocab_size)
        return spec, tokenizer, plan

    async def _prepare_vision_chat(
        self,
        req: ChatCompletionRequest,
        entry: ModelEntry,
        tokenizer: ModelTokenizer,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        constraint: Constraint | None,
    ) -> GenerationSpec:
        """Images: the model's processor expands the prompt and makes the pixels; both
        go to the worker (vLLM runs the vision encoder on them)."""
        if await asyncio.to_thread(lambda: tokenizer.processor) is None:
            raise InvalidRequestError(
                f"the model `{req.model}` does not accept images", param="messages")
        urls = [url for m in req.messages for url in m.image_urls()]
        allowed = self.config.allowed_local_media_path
        images = await asyncio.to_thread(
            lambda: [open_image(image_bytes(url, allowed)) for url in urls])
        # Image parts stay in place as the template's image markers.
        messages = [{**rendered, "content": m.template_content()}
                    for rendered, m in zip(messages, req.messages, strict=True)]
        with tracer.start_as_current_span("tokenize") as span:
            text = await asyncio.to_thread(
                tokenizer.render_chat, messages, req.add_generation_prompt, tools
            )
            try:
                ids, tensors = await asyncio.to_thread(tokenizer.process_images, text, images)
            except (ValueError, TypeError) as exc:  # the processor's own validation
                raise InvalidRequestError(f"image processing failed: {exc}",
                                          param="messages") from exc
            span.set_attribute("kvmesh.prompt_tokens", len(ids))
        mm_inputs = multimodal_inputs(ids, tensors, tokenizer.image_token_id, len(images))
        spec = self._spec(req, entry, ids, text, constraint, tokenizer.vocab_size)
        return replace(spec, mm_inputs=mm_inputs)

    async def prepare_completion(
        self, req: CompletionRequest
    ) -> tuple[list[GenerationSpec], ModelTokenizer]:
        """One spec per prompt (a batch of prompts is several generations)."""
        entry, tokenizer = await self.tokenizer(req.model)
        constraint = single_constraint(req)
        vocab = tokenizer.vocab_size
        specs = []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                with tracer.start_as_current_span("tokenize") as span:
                    ids = await asyncio.to_thread(tokenizer.encode, prompt, True)
                    span.set_attribute("kvmesh.prompt_tokens", len(ids))
                specs.append(self._spec(req, entry, ids, prompt, constraint, vocab))
            else:
                if any(t >= vocab for t in prompt):
                    raise InvalidRequestError(
                        f"prompt token ids must be below the vocabulary size {vocab}",
                        param="prompt")
                specs.append(self._spec(req, entry, list(prompt), "", constraint, vocab))
        return specs, tokenizer

    async def embed(self, req: EmbeddingRequest, request_id: str) -> EmbeddingResult:
        """Tokenize every input once, embed them concurrently on pooling workers."""
        entry, tokenizer = await self.tokenizer(req.model)
        if self.catalog.resolve(req.model).adapter:
            raise InvalidRequestError(
                f"`{req.model}` is a LoRA adapter; embeddings come from base models",
                param="model")
        check_dimensions(
            req.dimensions, req.model, EmbeddingModelInfo.from_config(tokenizer.model_config)
        )
        items = split_inputs(req.input)
        texts = [item for item in items if isinstance(item, str)]
        encoded = iter(await asyncio.to_thread(tokenizer.encode_batch, texts, True))
        inputs: list[tuple[list[int], str]] = []
        for item in items:
            if isinstance(item, str):
                ids, text = next(encoded), item
            else:
                check_token_ids(item, tokenizer.vocab_size)
                ids, text = item, ""
            check_input_length(len(ids), entry.max_context_length)
            inputs.append((ids, text))
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self.mesh.embed(f"{request_id}-{i}", entry.name, ids, text))
                    for i, (ids, text) in enumerate(inputs)
                ]
        except BaseExceptionGroup as failed:
            # One input failing fails the request; report its error, not the group.
            raise failed.exceptions[0] from None
        replies = [task.result() for task in tasks]
        return EmbeddingResult(
            vectors=[shape_embedding(r.embedding, req.dimensions, req.model) for r in replies],
            prompt_tokens=sum(
                r.prompt_tokens or len(ids) for r, (ids, _) in zip(replies, inputs, strict=True)
            ),
        )
