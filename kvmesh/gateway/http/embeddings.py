"""POST /v1/embeddings."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kvmesh.gateway.admission import ANONYMOUS
from kvmesh.gateway.core import new_request_id
from kvmesh.gateway.embeddings import encode_embedding
from kvmesh.gateway.http.generation import core_of
from kvmesh.gateway.http.streaming import cancel_on_disconnect
from kvmesh.gateway.lifecycle import embed
from kvmesh.gateway.schemas import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)

router = APIRouter()


@router.post("/v1/embeddings", response_model=None)
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse | None:
    request.state.model = body.model
    rid = new_request_id("embd")
    created = int(time.time())
    key = getattr(request.state, "key", ANONYMOUS)
    result = await cancel_on_disconnect(request, embed(core_of(request), key, body, rid))
    if result is None:
        return None
    response = EmbeddingResponse(
        id=rid, created=created, model=body.model,
        data=[
            EmbeddingData(index=i, embedding=encode_embedding(v, body.encoding_format))
            for i, v in enumerate(result.vectors)
        ],
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens,
                             total_tokens=result.prompt_tokens),
    )
    return JSONResponse(response.model_dump())
