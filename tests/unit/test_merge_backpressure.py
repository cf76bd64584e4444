"""A batch of prompts merges its streams through a bounded queue: a slow reader holds
the prompts' streams (and through gRPC flow control their workers) back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kvmesh.gateway.pipeline import MERGE_QUEUE_EVENTS, ChoiceDelta, merge_generations

pytestmark = pytest.mark.unit


async def test_a_slow_reader_holds_the_prompt_streams_back() -> None:
    pulled = [0, 0, 0]

    async def endless(i: int) -> AsyncIterator[ChoiceDelta]:
        while True:
            pulled[i] += 1
            await asyncio.sleep(0)
            yield ChoiceDelta(0, "x")

    merged = merge_generations([endless(i) for i in range(3)], 1)
    for _ in range(5):  # the reader takes a few events, slowly
        await anext(merged)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
    taken = sum(pulled)
    await merged.aclose()  # type: ignore[attr-defined]
    # What the reader took, the queue, and one event in each pump's hand.
    assert taken <= 5 + MERGE_QUEUE_EVENTS + 3, taken
