"""What each step of the gateway's own path costs, in µs, measured in one process.

``python -m kvmesh.gateway.step_costs MODEL_DIR`` prints JSON: per request (chat
template, tokenization, the trips to a thread) and per streamed token (incremental
detokenization, a chunk's JSON, the HTTP middleware relaying an SSE frame), each the way
the gateway did it before docs/benchmarks.md's "front end's share" work and the way it
does now. No network, no engine: these are the gateway's CPU costs alone.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

PROMPT = ("Summarise the following notes for a colleague who missed the meeting. "
          "The budget was approved, the launch moves to March, and the team will hire "
          "two engineers. Questions about the office move stay open. ") * 3
REPLY = ("The meeting approved the budget and moved the launch to March; two engineers "
         "will be hired, and the office move is still undecided. Ünïcödé ✓. ") * 8


def _per_call(fn: Callable[[], Any], n: int) -> float:
    """Median over 5 batches of ``n`` calls, µs per call."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return round(sorted(runs)[2], 2)


def long_prompt_costs(tokenizer: Any) -> dict[str, float]:
    """Tokenizing vLLM's ``prefix_repetition`` prompts (2,048-token prefixes of random
    tokens, 32 of them, each with its own 256-token suffix: the routing bench's
    workload), as the Rust tokenizer did before (``encode``, offsets and all, tokenizers'
    10,000-word BPE cache) and as the gateway does now; per prompt, warm."""
    import random

    from tokenizers import Tokenizer

    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(tokenizer.vocab_size) for _ in range(n)]

    heads = [tokens(2048) for _ in range(32)]
    texts = [tokenizer.decode(heads[i % 32] + tokens(256)) for i in range(160)]
    before = Tokenizer.from_str(tokenizer.backend.to_str())
    before.no_truncation()
    before.no_padding()

    def old() -> None:
        for text in texts:
            before.encode(text, add_special_tokens=False)

    def new() -> None:
        for text in texts:
            tokenizer.encode(text, False)

    old()  # each tokenizer's cache as a server's after its first requests
    new()
    return {"tokenize_prefix_repetition_prompt_before_us": round(
                _per_call(old, 1) / len(texts), 2),
            "tokenize_prefix_repetition_prompt_us": round(_per_call(new, 1) / len(texts), 2)}


def request_costs(tokenizer: Any) -> dict[str, float]:
    messages = [{"role": "user", "content": PROMPT}]
    text = tokenizer.render_chat(messages, True)

    async def threads(trips: int) -> float:
        start = time.perf_counter()
        for _ in range(200):
            for _ in range(trips):
                await asyncio.to_thread(lambda: None)
        return (time.perf_counter() - start) / 200 * 1e6

    return {
        "chat_template_us": _per_call(lambda: tokenizer.render_chat(messages, True), 200),
        "tokenize_transformers_us": _per_call(lambda: tokenizer.hf.encode(
            text, add_special_tokens=False), 200),
        "tokenize_rust_us": _per_call(lambda: tokenizer.encode(text, False), 200),
        "thread_trips_2_us": round(asyncio.run(threads(2)), 2),
        "thread_trips_1_us": round(asyncio.run(threads(1)), 2),
        **long_prompt_costs(tokenizer),
    }


def token_costs(tokenizer: Any) -> dict[str, float]:
    from kvmesh.gateway.detokenize import TextAssembler
    from kvmesh.gateway.http.chat import _without_nulls
    from kvmesh.gateway.http.chunk_json import ChatChunkTemplate
    from kvmesh.gateway.http.streaming import sse, without_null_usage
    from kvmesh.gateway.schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta

    ids = tokenizer.encode(REPLY, False)

    def detokenize() -> None:
        assembler = TextAssembler(tokenizer.backend)
        for t in ids:
            assembler.add((t,))

    def general() -> str:
        payload = without_null_usage(ChatCompletionChunk(
            id="chatcmpl-0123456789abcdef", created=1764806400, model="smollm2",
            choices=[ChatChunkChoice(index=0, delta=ChatDelta(content=" Paris"))],
        ).model_dump())
        for choice in payload["choices"]:
            choice["delta"] = _without_nulls(choice["delta"])
        return sse(payload)

    template = ChatChunkTemplate("chatcmpl-0123456789abcdef", 1764806400, "smollm2")
    assert template.content(0, " Paris", None) == general()
    base, guard = asyncio.run(_middleware_costs())
    return {
        "detokenize_us": round(_per_call(detokenize, 20) / len(ids), 2),
        "chunk_json_pydantic_us": _per_call(general, 2000),
        "chunk_json_template_us": _per_call(lambda: template.content(0, " Paris", None), 2000),
        "middleware_base_http_us": base,
        "middleware_plain_asgi_us": guard,
    }


async def _middleware_costs(frames: int = 2000) -> tuple[float, float]:
    """µs per SSE frame that a streaming response spends in the gateway's request
    middleware: Starlette's BaseHTTPMiddleware (before) vs the plain ASGI guard (now),
    each over the same StreamingResponse app, net of the bare app."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import StreamingResponse

    async def body() -> AsyncIterator[str]:
        for _ in range(frames):
            yield "data: {}\n\n"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await StreamingResponse(body(), media_type="text/event-stream")(scope, receive, send)

    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    async def plain(scope: Any, receive: Any, send: Any) -> None:
        async def relay(message: Any) -> None:
            await send(message)
        await app(scope, receive, relay)

    async def run(asgi: Any) -> float:
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [],
                 "query_string": b"", "asgi": {"version": "3.0"}, "http_version": "1.1"}

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(3600)  # the client never leaves
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            return None

        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            await asgi(scope, receive, send)
            best = min(best, (time.perf_counter() - start) / frames * 1e6)
        return best

    bare = await run(app)
    return (round(await run(BaseHTTPMiddleware(app, passthrough)) - bare, 2),
            round(await run(plain) - bare, 2))


def main(argv: list[str]) -> int:
    from kvmesh.gateway.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(Path(argv[0]))
    print(json.dumps({"per_request": request_costs(tokenizer),
                      "per_token": token_costs(tokenizer)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
