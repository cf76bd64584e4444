"""`kvmesh bench pd`: aggregated (2 x both) vs disaggregated (1 prefill + 1 decode).

The same two CPU cores, one engine pinned to each, the same mixed workload twice:
short prompts that decode for a while, and long uncached prompts arriving while they
do. Reported per deployment: TTFT and inter-token latency (p50/p99) of the short
streams (what a long prefill next to them stalls), TTFT of the long prompts, and for
the P/D run the KV bytes NIXL moved, its transfer time and bandwidth, next to a plain
in-process ``memcpy`` (numpy copy) of the same number of bytes in the same run.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel, Field

from kvmesh.bench.sse import chunk_text, completion_chunks
from kvmesh.bench.stats import percentile
from kvmesh.core.mesh_config import MeshConfig


class Workload(BaseModel):
    """Short streams decoding while long prompts arrive: what P/D protects them from."""

    shorts: int = Field(4, description="Concurrent short requests.")
    short_max_tokens: int = Field(96, description="Tokens each short request streams.")
    longs: int = Field(4, description="Long prompts, which no cache holds.")
    long_tokens: int = Field(1500, description="Tokens of each long prompt.")
    long_max_tokens: int = Field(8, description="A long request's output (it is there to "
                                 "prefill, not to decode).")
    long_every_s: float = Field(2.0, description="Seconds between long arrivals.")
    first_long_at_s: float = Field(1.0, description="When the first long prompt arrives.")


@dataclass
class Result:
    kind: str
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


async def _stream(client: httpx.AsyncClient, base_url: str, model: str, ids: list[int],
                  max_tokens: int, kind: str) -> Result:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    result = Result(kind)
    start = last = time.perf_counter()
    async for chunk in completion_chunks(client, base_url, body):
        if not chunk_text(chunk):
            continue
        now = time.perf_counter()
        if result.tokens == 0:
            result.ttft = now - start
        else:
            result.gaps.append(now - last)
        last = now
        result.tokens += 1
    return result


def _prompts(vocab: int, workload: Workload, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token-id prompts: distinct short ones, and long ones no cache holds."""
    rng = np.random.default_rng(seed)
    shorts = [[int(x) for x in rng.integers(1000, vocab - 1000, 24)]
              for _ in range(workload.shorts)]
    longs = [[int(x) for x in rng.integers(1000, vocab - 1000, workload.long_tokens)]
             for _ in range(workload.longs)]
    return shorts, longs


async def _run_workload(base_url: str, model: str, workload: Workload, seed: int,
                        vocab: int) -> list[Result]:
    shorts, longs = _prompts(vocab, workload, seed)
    async with httpx.AsyncClient(timeout=600) as client:
        await _stream(client, base_url, model, shorts[0][:8], 4, "warm")

        async def long_at(i: int) -> Result:
            await asyncio.sleep(workload.first_long_at_s + i * workload.long_every_s)
            return await _stream(client, base_url, model, longs[i], workload.long_max_tokens,
                                 "long")

        tasks = [_stream(client, base_url, model, ids, workload.short_max_tokens, "short")
                 for ids in shorts]
        tasks += [long_at(i) for i in range(workload.longs)]
        return list(await asyncio.gather(*tasks))


def _scrape(endpoints: list[str]) -> dict[str, float]:
    """Every sample summed over endpoints and labels, except mode/source (kept)."""
    totals: dict[str, float] = {}
    for endpoint in endpoints:
        text = httpx.get(f"http://{endpoint}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            for label in ("mode", "source"):
                if f'{label}="' in name_labels:
                    name += ":" + name_labels.split(f'{label}="', 1)[1].split('"', 1)[0]
            try:
                totals[name] = totals.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return totals


def _summary(results: list[Result]) -> dict[str, float]:
    def q(values: list[float], p: float) -> float:
        return round(percentile(values, p), 4) if values else float("nan")

    short = [r for r in results if r.kind == "short"]
    long = [r for r in results if r.kind == "long"]
    gaps = [g for r in short for g in r.gaps]
    return {
        "short_ttft_p50_s": q([r.ttft for r in short], 0.5),
        "short_ttft_p99_s": q([r.ttft for r in short], 0.99),
        "short_itl_p50_s": q(gaps, 0.5),
        "short_itl_p99_s": q(gaps, 0.99),
        "short_itl_max_s": round(max(gaps), 4) if gaps else float("nan"),
        "long_ttft_p50_s": q([r.ttft for r in long], 0.5),
        "long_ttft_p99_s": q([r.ttft for r in long], 0.99),
        "output_tokens": sum(r.tokens for r in results),
    }


def memcpy_gb_s(nbytes: int, repeats: int = 5) -> float:
    """Best-of plain in-process copy bandwidth for ``nbytes`` (numpy copyto)."""
    nbytes = max(int(nbytes), 1)
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


async def _deployment(label: str, config: MeshConfig, workload: Workload, seed: int
                      ) -> dict[str, Any]:
    from kvmesh.launch.app import build_app

    mesh = build_app(config)
    try:
        state = await mesh.start()
        model = state["workers"][0]["model"]
        endpoints = [w["metrics"] for w in state["workers"] if w.get("metrics")]
        gateway_metrics = state["http"].removeprefix("http://").removesuffix("/v1")
        before = _scrape(endpoints)
        started = time.perf_counter()
        results = await _run_workload(state["http"], model, workload, seed, 49152)
        wall = time.perf_counter() - started
        after = _scrape(endpoints)
        modes = _scrape([gateway_metrics])

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        out: dict[str, Any] = {
            "deployment": label,
            "roles": [w["role"] for w in state["workers"]],
            "startup_s": state["startup_s"],
            "wall_s": round(wall, 2),
            **_summary(results),
            "requests_disaggregated": modes.get(
                "kvmesh_gateway_pd_requests_total:disaggregated", 0.0),
            "requests_aggregated": modes.get("kvmesh_gateway_pd_requests_total:aggregated", 0.0),
        }
        moved = delta("vllm:nixl_bytes_transferred_sum")
        xfer_s = delta("vllm:nixl_xfer_time_seconds_sum")
        if moved > 0:
            out["kv_bytes_moved"] = int(moved)
            out["kv_transfers"] = int(delta("vllm:nixl_bytes_transferred_count"))
            out["kv_transfer_s"] = round(xfer_s, 4)
            out["kv_transfer_gb_s"] = round(moved / xfer_s / 1e9, 2) if xfer_s > 0 else None
            out["memcpy_same_bytes_gb_s"] = round(memcpy_gb_s(int(moved)), 2)
            out["prompt_tokens_from_transfer"] = int(
                delta("vllm:prompt_tokens_by_source_total:external_kv_transfer"))
        return out
    finally:
        await mesh.stop()


async def pd_bench(base: MeshConfig, workload: Workload, disaggregation: str, seed: int
                   ) -> dict[str, Any]:
    aggregated = base.model_copy(update={"workers": 2, "prefill": 0, "decode": 0})
    router = base.router.model_copy(update={"disaggregation": disaggregation})
    split = base.model_copy(update={"workers": 0, "prefill": 1, "decode": 1, "router": router})
    runs = [await _deployment("aggregated (2 x both)", aggregated, workload, seed),
            await _deployment(f"disaggregated (1P+1D, {disaggregation})", split, workload,
                              seed)]
    return {"workload": workload.model_dump(), "runs": runs,
            "note": "same prompts, same seed; one engine pinned per core in both runs"}


def run_pd_bench(base: MeshConfig, workload: Workload, disaggregation: str, seed: int,
                 out: Path | None) -> dict[str, Any]:
    result = asyncio.run(pd_bench(base, workload, disaggregation, seed))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
    return result

