"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's run-time LoRA
endpoints), answered as vLLM does: a plain-text success line, or an OpenAI error."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from kvmesh.core.errors import InvalidRequestError
from kvmesh.gateway.adapters import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from kvmesh.gateway.http.generation import core_of

router = APIRouter()


def _allowed(request: Request) -> None:
    if not core_of(request).config.allow_runtime_lora_updating:
        raise InvalidRequestError(
            "run-time LoRA loading is off on this gateway (allow_runtime_lora_updating)")


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> str:
    _allowed(request)
    request.state.model = body.model or ""
    await core_of(request).adapters.load(body)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> str:
    _allowed(request)
    request.state.model = body.model or ""
    await core_of(request).adapters.unload(body)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
