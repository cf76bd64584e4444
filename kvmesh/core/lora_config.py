"""Multi-LoRA settings of a model (part of ``EngineConfig``), and how a request names an
adapter.

Clients address an adapter through the OpenAI ``model`` field, as with Ray Serve LLM and
``vllm serve --enable-lora``: ``base:adapter`` or the adapter's plain name. Between the
gateway and a worker the adapter rides as gRPC metadata on ``VllmEngine.Generate``
(:data:`ADAPTER_METADATA_KEY`): the ecosystem's VllmEngine contract has no LoRA field,
and a request without the key is an ordinary base-model request to any VllmEngine server.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

#: gRPC metadata key naming the LoRA adapter of a ``VllmEngine.Generate`` call.
ADAPTER_METADATA_KEY = "kvmesh-lora-adapter"

#: Adapter names: no ':' (it separates base model and adapter) and no whitespace.
_ADAPTER_NAME = re.compile(r"^[^:\s]+$")


def check_adapter_name(name: str) -> str:
    """``name`` if it can name an adapter; ValueError (saying why) otherwise."""
    if not _ADAPTER_NAME.match(name):
        raise ValueError(
            f"LoRA adapter name {name!r} must be non-empty, without ':' (it separates "
            "'base:adapter' in the model field) or whitespace")
    return name


class LoraConfig(BaseModel):
    """LoRA adapters of one model: vLLM's LoRA engine arguments, plus the adapters the
    workers load on demand (by name, from any model source: docs/models.md)."""

    model_config = {"extra": "forbid"}

    enable_lora: bool = Field(
        True, description="Serve LoRA adapters on this model's workers (vLLM enable_lora); "
        "a `lora` section turns it on unless this says false.")
    max_loras: int = Field(
        1, ge=1, description="Adapters one engine batch may mix (vLLM max_loras); a request "
        "for another adapter waits for a slot.")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="Largest adapter rank accepted (vLLM max_lora_rank: 1, 8, 16, 32, "
        "64, 128, 256, 320 or 512); an adapter of higher rank fails to load.")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters a worker keeps loaded (vLLM max_cpu_loras, an "
        "LRU); None: max_loras. Requests for a loaded adapter skip the load.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapter name -> source: a local adapter folder (adapter_config.json + "
        "weights), hf://org/name[@revision], s3://bucket/prefix or gs://bucket/prefix. "
        "Fetched into the node cache and loaded on a worker's first request for it.")

    @field_validator("adapters")
    @classmethod
    def _names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name, source in adapters.items():
            check_adapter_name(name)
            if not source.strip():
                raise ValueError(f"LoRA adapter {name!r} has an empty source")
        return adapters

    @model_validator(mode="after")
    def _cache_holds_a_batch(self) -> LoraConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                f"({self.max_loras})")
        return self

    @property
    def slots(self) -> int:
        """Adapters a worker keeps loaded (0 when LoRA is off)."""
        if not self.enable_lora:
            return 0
        return self.max_cpu_loras or self.max_loras


def parse_lora_module(text: str) -> tuple[str, str]:
    """One ``--lora-modules`` value, as ``vllm serve`` takes it: ``NAME=PATH_OR_URI`` or
    the JSON form ``{"name": ..., "path": ...}``. ValueError says what is wrong."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules {text!r}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("path"), str):
            raise ValueError(f"--lora-modules {text!r}: JSON needs string 'name' and 'path'")
        name, source = data["name"], data["path"]
    else:
        name, sep, source = text.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--lora-modules {text!r}: expected NAME=PATH_OR_URI")
    return check_adapter_name(name), source


def split_model_field(model: str) -> tuple[str, str]:
    """``base:adapter`` -> (base, adapter); anything else -> (model, '')."""
    base, sep, adapter = model.rpartition(":")
    if sep and base and adapter:
        return base, adapter
    return model, ""
