"""GET /v1/models and the service endpoints: /health, /metrics, /sd/prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvmesh.gateway.discovery import prometheus_targets
from kvmesh.gateway.http.generation import core_of
from kvmesh.gateway.schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The served models, and each LoRA adapter with its base model as ``parent``."""
    return ModelList(data=[
        ModelCard(id=name, created=e.created, max_model_len=e.max_context_length,
                  parent=parent or None)
        for name, parent, e in core_of(request).catalog.cards()
    ])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    resolved = core_of(request).catalog.resolve(model_id)
    e = resolved.entry
    return ModelCard(id=model_id if resolved.adapter else e.name, created=e.created,
                     max_model_len=e.max_context_length,
                     parent=e.name if resolved.adapter else None)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Readiness: 200 once a model is served, 503 while starting or draining."""
    core = core_of(request)
    ready = core.ready_models()
    status = "draining" if core.draining else "ok" if ready else "starting"
    return JSONResponse({"status": status, "models": ready},
                        status_code=200 if status == "ok" else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    return Response(core_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/sd/prometheus")
async def prometheus_sd(request: Request) -> JSONResponse:
    """Prometheus HTTP service discovery: gateway, router and every worker."""
    core = core_of(request)
    gateway = core.http_address or request.url.netloc
    return JSONResponse(prometheus_targets(
        gateway, core.catalog.router_metrics_endpoint, core.catalog.workers))
