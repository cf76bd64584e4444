"""The gateway's state and request preparation, shared by the HTTP and gRPC APIs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import uuid
from pathlib import Path

from opentelemetry import trace

from kvmesh.config import GatewayConfig
from kvmesh.gateway.catalog import ModelCatalog, ModelEntry, watch_router
from kvmesh.gateway.mesh import MeshClient
from kvmesh.gateway.metrics import GatewayMetrics, activate
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest
from kvmesh.gateway.tokenizers import ModelTokenizer, TokenizerStore
from kvmesh.gateway.translate import (
    GenerationSpec,
    requested_max_tokens,
    resolve_max_tokens,
    sampling_params,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class GatewayCore:
    def __init__(self, config: GatewayConfig, cache_dir: Path | None = None) -> None:
        self.config = config
        self.mesh = MeshClient(config.router, config.route_timeout_s, config.request_timeout_s,
                               config.prefill_timeout_s)
        self.catalog = ModelCatalog()
        self.metrics = GatewayMetrics(known_models=self.catalog.names)
        self.metrics.serve_also(self.mesh.pd_metrics.registry)
        activate(self.metrics)
        self.tokenizers = TokenizerStore(
            cache_dir or Path(tempfile.gettempdir()) / "kvmesh-tokenizers"
        )
        self._watch: asyncio.Task[None] | None = None
        #: host:port of the HTTP API once bound (the gateway's own /metrics target).
        self.http_address = ""

    async def start(self) -> None:
        self._watch = asyncio.create_task(
            watch_router(self.mesh.router, self.catalog, self._on_new_model)
        )

    def _on_new_model(self, entry: ModelEntry) -> None:
        self.tokenizers.prefetch(entry.name, entry.endpoints)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.mesh.close()

    def ready_models(self) -> list[str]:
        return [e.name for e in self.catalog.all() if self.tokenizers.ready(e.name)]

    async def tokenizer(self, model: str) -> tuple[ModelEntry, ModelTokenizer]:
        entry = self.catalog.get(model)
        return entry, await self.tokenizers.get(model, entry.endpoints)

    def _spec(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        entry: ModelEntry,
        prompt_ids: list[int],
        prompt_text: str,
    ) -> GenerationSpec:
        max_tokens = resolve_max_tokens(
            requested_max_tokens(req),
            len(prompt_ids),
            entry.max_context_length,
            self.config.default_max_tokens,
        )
        return GenerationSpec(
            model=req.model,
            prompt_ids=prompt_ids,
            sampling=sampling_params(req, max_tokens),
            stop=tuple(req.stop_list()),
            n=req.n,
            max_tokens=max_tokens,
            prompt_text=prompt_text,
        )

    async def prepare_chat(
        self, req: ChatCompletionRequest
    ) -> tuple[GenerationSpec, ModelTokenizer]:
        """Render the chat template and tokenize once; token ids cross the mesh."""
        entry, tokenizer = await self.tokenizer(req.model)
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        with tracer.start_as_current_span("tokenize") as span:
            text = await asyncio.to_thread(
                tokenizer.render_chat, messages, req.add_generation_prompt
            )
            ids = await asyncio.to_thread(tokenizer.encode, text, False)
            span.set_attribute("kvmesh.prompt_tokens", len(ids))
        return self._spec(req, entry, ids, text), tokenizer

    async def prepare_completion(
        self, req: CompletionRequest
    ) -> tuple[GenerationSpec, ModelTokenizer]:
        entry, tokenizer = await self.tokenizer(req.model)
        if isinstance(req.prompt, str):
            text = req.prompt
            with tracer.start_as_current_span("tokenize") as span:
                ids = await asyncio.to_thread(tokenizer.encode, text, True)
                span.set_attribute("kvmesh.prompt_tokens", len(ids))
        else:
            ids = list(req.prompt)
            text = ""
        return self._spec(req, entry, ids, text), tokenizer
