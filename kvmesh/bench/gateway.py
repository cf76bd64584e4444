"""`kvmesh bench gateway`: what the mesh costs over calling vLLM directly.

Starts a local mesh (router + 1 worker + gateway, like `kvmesh up`), then sends the
same prompts, side by side in one run, (a) through the gateway's OpenAI API and (b)
straight to the worker's VllmEngine.Generate with the token ids the gateway would
send. Fixed output lengths (ignore_eos) make the token counts identical.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.bench.stats import percentile
from kvmesh.core.mesh_config import MeshConfig

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "List some uses of copper.",
    "Describe the water cycle for a child.",
]


async def _via_gateway(
    base_url: str, model: str, prompt: str, max_tokens: int
) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async with httpx.AsyncClient(timeout=300) as client, client.stream(
        "POST", base_url + "/chat/completions", json=body
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and not ttft:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


async def _direct(
    stub: vllm_engine_pb2_grpc.VllmEngineStub, ids: list[int], max_tokens: int, rid: str
) -> tuple[float, int]:
    start = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async for r in stub.Generate(vllm_engine_pb2.GenerateRequest(
        request_id=rid,
        tokenized=vllm_engine_pb2.TokenizedInput(input_ids=ids),
        sampling_params=vllm_engine_pb2.SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True),
        stream=True,
    )):
        if r.WhichOneof("response") == "chunk":
            if not ttft:
                ttft = time.perf_counter() - start
            tokens += len(r.chunk.token_ids)
    return ttft, tokens


async def _round(
    name: str, calls: list[Callable[[], Awaitable[tuple[float, int]]]], concurrency: int
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[tuple[float, int]]]) -> tuple[float, int]:
        async with sem:
            result: tuple[float, int] = await call()
            return result

    start = time.perf_counter()
    results = await asyncio.gather(*[one(c) for c in calls])
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"path": name, "requests": len(results), "output_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p90_s": round(percentile(ttfts, 0.9), 4)}


async def gateway_overhead(
    config: MeshConfig, requests: int, concurrency: int, max_tokens: int
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from kvmesh.launch.app import build_app
    from kvmesh.models.source import resolve_model

    mesh = build_app(config)
    try:
        state = await mesh.start()
        model = state["workers"][0]["model"]
        tok = AutoTokenizer.from_pretrained(str(resolve_model(config.worker.engine.model)))
        prompts = [PROMPTS[i % len(PROMPTS)] + f" (variant {i})" for i in range(requests)]
        ids = [tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False) for p in prompts]
        async with grpc.aio.insecure_channel(state["workers"][0]["endpoint"]) as channel:
            stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
            # Warm both paths (first requests pay one-time costs).
            await _direct(stub, ids[0], 4, "warm-direct")
            await _via_gateway(state["http"], model, prompts[0], 4)
            rounds = []
            for name in ("direct", "gateway", "direct", "gateway"):
                calls: list[Callable[[], Awaitable[tuple[float, int]]]]
                if name == "direct":
                    calls = [partial(_direct, stub, x, max_tokens, f"d{i}-{time.time()}")
                             for i, x in enumerate(ids)]
                else:
                    calls = [partial(_via_gateway, state["http"], model, p, max_tokens)
                             for p in prompts]
                rounds.append(await _round(name, calls, concurrency))
        best = {
            name: max((r for r in rounds if r["path"] == name), key=lambda r: r["tokens_per_s"])
            for name in ("direct", "gateway")
        }
        return {
            "startup_s": state["startup_s"],
            "model": model,
            "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
            "rounds": rounds,
            "gateway_over_direct_throughput": round(
                best["gateway"]["tokens_per_s"] / best["direct"]["tokens_per_s"], 3),
            "gateway_minus_direct_ttft_p50_s": round(
                best["gateway"]["ttft_p50_s"] - best["direct"]["ttft_p50_s"], 4),
        }
    finally:
        await mesh.stop()


def run_gateway_bench(
    config: MeshConfig, requests: int, concurrency: int, max_tokens: int, out: Path | None
) -> dict[str, Any]:
    result = asyncio.run(gateway_overhead(config, requests, concurrency, max_tokens))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
    return result
