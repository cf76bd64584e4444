"""The benchmarks' streaming client: an OpenAI completions stream as parsed chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


async def completion_chunks(client: httpx.AsyncClient, base_url: str,
                            body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POST ``body`` to ``{base_url}/completions`` and yield each SSE ``data:`` chunk
    (the closing ``[DONE]`` is not one)."""
    async with client.stream("POST", base_url + "/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def chunk_text(chunk: dict[str, Any]) -> str:
    """The first choice's text in a chunk ('' for a usage-only chunk)."""
    choices = chunk.get("choices")
    return (choices[0].get("text") or "") if choices else ""
