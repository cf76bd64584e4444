"""Many concurrent streams through a gateway while something is killed under them:
what each client saw (text, token ids, finish, usage, error), and whether it hung.

Shared by the fake-engine integration tests and the real-vLLM e2e test of failover.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import httpx

from kvmesh.v1 import inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc


@dataclass
class StreamResult:
    """What one client received."""

    text: dict[int, str] = field(default_factory=dict)  # per choice
    token_ids: list[int] = field(default_factory=list)  # gRPC Complete: choice 0's ids
    pieces: int = 0  # content deltas received
    finish: dict[int, str] = field(default_factory=dict)
    usage: dict[str, int] | None = None
    error: str | None = None
    hung: bool = False
    n: int = 1

    @property
    def completed(self) -> bool:
        return self.error is None and not self.hung and len(self.finish) == self.n


async def http_chat_stream(client: httpx.AsyncClient, base_url: str, body: dict,
                           result: StreamResult) -> None:
    """One streamed chat completion over SSE, parsed into ``result`` as it arrives."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result.n = int(body.get("n", 1))
    async with client.stream("POST", f"{base_url}/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            result.error = f"HTTP {reply.status_code}: {(await reply.aread()).decode()}"
            return
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                result.error = event["error"]["message"]
                continue
            if event.get("usage"):
                result.usage = event["usage"]
            for choice in event.get("choices", []):
                content = choice["delta"].get("content") or ""
                if content:
                    result.pieces += 1
                    i = choice["index"]
                    result.text[i] = result.text.get(i, "") + content
                if choice.get("finish_reason"):
                    result.finish[choice["index"]] = choice["finish_reason"]


async def grpc_stream(channel: grpc.aio.Channel,
                      request: inference_pb2.ChatRequest | inference_pb2.CompletionRequest,
                      result: StreamResult) -> None:
    """One streamed Chat or Complete over the Inference gRPC API, into ``result``
    (a Complete's messages carry the token ids, choice 0's are collected)."""
    result.n = request.sampling.n if request.sampling.HasField("n") else 1
    stub = inference_pb2_grpc.InferenceStub(channel)
    call = stub.Chat(request) if isinstance(request, inference_pb2.ChatRequest) \
        else stub.Complete(request)
    try:
        async for reply in call:
            if reply.HasField("usage"):
                result.usage = {"prompt_tokens": reply.usage.prompt_tokens,
                                "completion_tokens": reply.usage.completion_tokens}
            for choice in reply.choices:
                if choice.text:
                    result.pieces += 1
                    result.text[choice.index] = result.text.get(choice.index, "") + choice.text
                if choice.index == 0:
                    result.token_ids.extend(choice.token_ids)
                if choice.finish_reason:
                    result.finish[choice.index] = choice.finish_reason
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"


async def kill_during_streams(
    streams: list[Callable[[StreamResult], Awaitable[None]]],
    kill: Callable[[], None],
    min_pieces: int,
    timeout_s: float,
) -> tuple[list[StreamResult], float]:
    """Start every stream; once each has received ``min_pieces`` deltas (or ended),
    ``kill()``; wait for all of them up to ``timeout_s`` after the kill (a stream still
    open then is hung). Returns the results and the kill's time (monotonic)."""
    results = [StreamResult() for _ in streams]
    tasks = [asyncio.create_task(s(r)) for s, r in zip(streams, results, strict=True)]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(
            t.done() or r.pieces >= min_pieces for t, r in zip(tasks, results, strict=True)):
        await asyncio.sleep(0.01)
    killed_at = time.monotonic()
    kill()
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task, result in zip(tasks, results, strict=True):
        if task in pending:
            result.hung = True
            task.cancel()
        elif task.exception() is not None:
            result.error = repr(task.exception())
    return results, killed_at


async def seconds_until_unreachable(router: str, worker_id: str, since: float,
                                    timeout_s: float = 10.0) -> float:
    """Seconds from ``since`` until the router reports the worker out of routing (or
    gone); ``timeout_s`` if it never does."""
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while time.monotonic() - since < timeout_s:
            reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2)
            status = {s.worker.worker_id: s for s in reply.workers}.get(worker_id)
            if status is None or status.unreachable:
                return time.monotonic() - since
            await asyncio.sleep(0.01)
    return timeout_s


def figures(results: list[StreamResult]) -> dict[str, float]:
    """Completed, ended with an error, hung: counts and shares of all streams."""
    total = len(results)
    completed = sum(r.completed for r in results)
    errors = sum(r.error is not None for r in results)
    hung = sum(r.hung for r in results)
    return {"streams": total, "completed": completed, "errors": errors, "hung": hung,
            "completed_share": completed / total, "error_share": errors / total}
