"""`kvmesh bench routing --mode real`: the same workloads against real vLLM workers.

Starts N kvmesh workers (real vLLM on CPU, one core each on this machine), then, for
each policy in turn and against the *same* workers with their prefix caches flushed:

- kvmesh policies: a kvmesh router (workers registered by address) + gateway;
- `smg:<policy>`: the SGLang/Shepherd model gateway (`smg launch`, gRPC mode, from
  its own venv) in front of the same workers, as the reference.

Requests are the workload's prompts as text (decoded once with the model's tokenizer)
sent open-loop at their arrival times to `/v1/completions` with streaming usage, so
every front end sees identical traffic. Per policy: TTFT percentiles, output tokens/s
and the prefix-cache hit rate vLLM itself reports (`usage.prompt_tokens_details`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from smg_grpc_proto import vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2

from kvmesh.bench.routing.misses import classify_logged, tally
from kvmesh.bench.routing.oracle import oracle_hits
from kvmesh.bench.routing.workloads import SimRequest
from kvmesh.bench.sse import chunk_text, completion_chunks
from kvmesh.bench.stats import ttft_summary
from kvmesh.core.net import free_port
from kvmesh.core.security_config import INTERNAL_TOKEN_ENV
from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from kvmesh.router import decision_log

log = logging.getLogger(__name__)


async def _flush(endpoints: list[str]) -> None:
    for endpoint in endpoints:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            await vllm_engine_pb2_grpc.VllmEngineStub(channel).FlushCache(
                common_pb2.FlushCacheRequest(), timeout=30)


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str,
               max_tokens: int, delay: float, slots: asyncio.Semaphore | None
               ) -> dict[str, Any]:
    if slots is None:
        await asyncio.sleep(delay)
    else:
        await slots.acquire()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = 0.0
    usage: dict[str, Any] = {}
    response_id = ""
    try:
        async for chunk in completion_chunks(client, url, body):
            response_id = response_id or str(chunk.get("id", ""))
            if not ttft and chunk_text(chunk):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    finally:
        if slots is not None:
            slots.release()
    details = usage.get("prompt_tokens_details") or {}
    return {"id": response_id, "ttft": ttft or time.perf_counter() - start,
            "prompt": float(usage.get("prompt_tokens", 0)),
            "cached": float(details.get("cached_tokens", 0) or 0),
            "completion": float(usage.get("completion_tokens", 0)),
            "end": time.perf_counter()}


async def _drive(url: str, model: str, prompts: list[tuple[float, str, int]],
                 timeout_s: float, concurrency: int = 0
                 ) -> tuple[list[dict[str, Any]], float]:
    """Send the workload (open loop at the arrival times, or a closed loop of
    ``concurrency`` requests out at once, in order); per-request results and the run's
    wall time."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*[
            _one(client, url, model, text, max_tokens, arrival, slots)
            for arrival, text, max_tokens in prompts
        ])
    return list(results), max(r["end"] for r in results) - start


ENGINE_COUNTERS = {
    "vllm:request_success_total": "requests",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:prefix_cache_hits_total": "hit_tokens",
}


def scrape_counters(url: str) -> dict[str, float]:
    """Sums of the engine counters in ENGINE_COUNTERS from one Prometheus page."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(ENGINE_COUNTERS.values(), 0.0)
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = ENGINE_COUNTERS.get(sample.name)
            if key is not None:
                totals[key] += sample.value
    return totals


def counter_deltas(before: list[dict[str, float]],
                   after: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per worker, what one run added to each counter."""
    return [{k: round(a[k] - b.get(k, 0.0), 1) for k in a}
            for b, a in zip(before, after, strict=True)]


def summarize(results: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    """Metrics over every request of every repetition of one policy."""
    prompt_tokens = sum(r["prompt"] for r in results)
    reported = any(r["cached"] for r in results)
    return {
        **ttft_summary(r["ttft"] for r in results),
        "throughput_tok_s": round(sum(r["completion"] for r in results) / wall_s, 1),
        "hit_rate": round(sum(r["cached"] for r in results) / prompt_tokens, 4)
        if prompt_tokens and reported else None,
        "oracle_hit_rate": None,
        "requests": len(results),
    }


class RealBench:
    def __init__(self, model_dir: Path, workers: int, workdir: Path,
                 smg_binary: str | None, engine_flags: dict[str, Any]) -> None:
        self.model_dir = model_dir
        self.n = workers
        self.dir = workdir
        self.smg = smg_binary
        self.engine_flags = engine_flags
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []
        self.metrics: list[str] = []
        self.model = ""
        #: The kvmesh front end's internal token (router and gateway share it, as under
        #: ``kvmesh up``): its gateway registers, as a deployed one does.
        self.front_env = {**os.environ, INTERNAL_TOKEN_ENV: secrets.token_urlsafe(32)}

    def start_workers(self) -> None:
        from kvmesh.worker.engine_args import cpu_binding

        for i in range(self.n):
            ready = self.dir / f"w{i}.ready"
            args = ["--no-ray", "--port", "0", "--metrics-port", "0", "--worker-id", f"w{i}",
                    "--ready-file",
                    str(ready), "--run-dir", str(self.dir), "--model", str(self.model_dir),
                    "--cpu-bind", cpu_binding(i, self.n, os.cpu_count() or 1)]
            if self.engine_flags.get("enforce_eager"):
                args.append("--enforce-eager")
            if self.engine_flags.get("block_size"):
                args += ["--block-size", str(self.engine_flags["block_size"])]
            if self.engine_flags.get("num_kv_blocks"):
                args += ["--num-kv-blocks", str(self.engine_flags["num_kv_blocks"])]
            self.procs.append(spawn_module("kvmesh.worker", args, self.dir / f"w{i}.log"))
        for i, proc in enumerate(self.procs):
            info = wait_ready_file(self.dir / f"w{i}.ready", 900, proc, f"worker {i}")
            self.endpoints.append(info["endpoint"])
            self.metrics.append(info["metrics"])
            self.model = info["model"]

    def engine_counters(self) -> list[dict[str, float]]:
        """Each worker's cumulative vLLM counters (requests, prompt and cache-hit tokens)."""
        return [scrape_counters(f"http://{endpoint}/metrics") for endpoint in self.metrics]

    def kvmesh_front(self, spec: str) -> tuple[str, list[subprocess.Popen[bytes]]]:
        """A kvmesh router + gateway for ``POLICY`` or ``POLICY/N`` (N: the router's
        ``--max-inflight-per-worker``, requests wait at the router beyond it)."""
        policy, _, inflight = spec.partition("/")
        tag = spec.replace("/", "-")
        for stale in (f"router-{tag}.ready", f"gateway-{tag}.ready",  # an earlier turn's
                      f"decisions-{tag}.jsonl"):
            (self.dir / stale).unlink(missing_ok=True)
        args = ["--port", "0", "--metrics-port", "0", "--policy", policy,
                "--ready-file", str(self.dir / f"router-{tag}.ready"),
                "--decision-log", str(self.decision_log(spec))]
        if inflight:
            args += ["--max-inflight-per-worker", inflight]
        for endpoint in self.endpoints:
            args += ["--worker", endpoint]
        router = spawn_module("kvmesh.router", args, self.dir / f"router-{tag}.log",
                              env=self.front_env)
        address = wait_ready_file(self.dir / f"router-{tag}.ready", 60, router)["grpc"]
        gateway = spawn_module(
            "kvmesh.gateway",
            ["--router", address, "--port", "0", "--grpc-port", "0",
             "--ready-file", str(self.dir / f"gateway-{tag}.ready")],
            self.dir / f"gateway-{tag}.log", env=self.front_env)
        url = wait_ready_file(self.dir / f"gateway-{tag}.ready", 60, gateway)["http"]
        return url, [gateway, router]

    def decision_log(self, spec: str) -> Path:
        """Where the kvmesh router of ``spec`` logs its kv_aware decisions."""
        return self.dir / f"decisions-{spec.replace('/', '-')}.jsonl"

    def smg_front(self, policy: str) -> tuple[str, list[subprocess.Popen[bytes]]]:
        assert self.smg is not None
        port = free_port()
        log_file = open(self.dir / f"smg-{policy}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [self.smg, "launch", "--host", "127.0.0.1", "--port", str(port),
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
             "--worker-urls", *[f"grpc://{e}" for e in self.endpoints],
             "--policy", policy, "--backend", "vllm", "--model-path", str(self.model_dir)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return f"http://127.0.0.1:{port}/v1", [proc]

    async def wait_ready(self, url: str, procs: list[subprocess.Popen[bytes]]) -> str:
        """Ready = a completion goes through; returns the model name it answered to."""
        deadline = time.monotonic() + 180
        async with httpx.AsyncClient(timeout=30) as client:
            while time.monotonic() < deadline:
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"front end at {url} exited; see logs in {self.dir}")
                try:
                    models = (await client.get(url + "/models")).json()["data"]
                    name = models[0]["id"] if models else self.model
                    reply = await client.post(url + "/completions", json={
                        "model": name, "prompt": "ready?", "max_tokens": 1})
                    if reply.status_code == 200:
                        return str(name)
                except (httpx.HTTPError, KeyError, ValueError, IndexError):
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"front end at {url} never served a completion")

    def stop(self) -> None:
        for proc in self.procs:
            terminate(proc, 30)


def front_cpu_s(procs: list[subprocess.Popen[bytes]]) -> list[float]:
    """CPU seconds each of the front end's processes (gateway + router, or smg) used so
    far: on these 2 cores, time the engines did not get."""
    used = []
    for proc in procs:
        times = None
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(proc.pid).cpu_times()
        used.append(times.user + times.system if times is not None else 0.0)
    return used


def front_cpu_per_request(policy: str, spent: list[float], requests: int
                          ) -> dict[str, Any]:
    """The front end's CPU per request, in all and per process (a kvmesh front end
    is a gateway and a router, smg one process)."""
    names = ["smg"] if policy.startswith("smg:") else ["gateway", "router"]
    per = [round(1000 * s / max(requests, 1), 2) for s in spent]
    return {"front_cpu_ms_per_request": round(sum(per), 2),
            "front_cpu_ms_per_request_by_process": dict(zip(names, per, strict=True))}


def explain_misses(log: Path, results: list[dict[str, Any]], oracle: list[int]
                   ) -> list[tuple[str, int] | None]:
    """Each request's avoidable miss and its rule, from the router's decision log."""
    if not log.exists():
        return []
    entries = decision_log.read(log)
    return [classify_logged(entries[r["id"]], int(r["cached"]), hits)
            for r, hits in zip(results, oracle, strict=True) if r["id"] in entries]


def run_real(workload: list[SimRequest], policies: list[str], workers: int,
             model_dir: Path, smg_binary: str | None, engine_flags: dict[str, Any],
             timeout_s: float = 600, repeat: int = 1, concurrency: int = 0
             ) -> dict[str, dict[str, Any]]:
    """Each policy runs the workload ``repeat`` times, the policies taking turns
    (A B C A B C ...), so slow drifts of a shared machine hit every policy alike;
    metrics pool every request of every turn. kv_aware's avoidable misses are put
    down to the rule that caused each (``misses``, from its router's decision log)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [(r.arrival_s, str(tok.decode(list(r.prompt))), r.output_tokens) for r in workload]
    # What the engines see is the text tokenized again: replay exactly those ids.
    replayed = [tok(text, add_special_tokens=False)["input_ids"] for _, text, _ in prompts]
    per_request = oracle_hits(replayed, int(engine_flags.get("block_size") or 32))
    oracle = round(sum(per_request) / max(sum(map(len, replayed)), 1), 4)
    if not smg_binary:
        for policy in [p for p in policies if p.startswith("smg:")]:
            log.warning("skipping %s: no smg binary (pass --smg PATH)", policy)
        policies = [p for p in policies if not p.startswith("smg:")]
    raw: dict[str, list[dict[str, float]]] = {p: [] for p in policies}
    walls = dict.fromkeys(policies, 0.0)
    engines: dict[str, list[list[dict[str, float]]]] = {p: [] for p in policies}
    misses: dict[str, list[tuple[str, int] | None]] = {p: [] for p in policies}
    front_cpu: dict[str, list[float]] = {p: [] for p in policies}
    with tempfile.TemporaryDirectory(prefix="kvm-real-") as d:
        bench = RealBench(model_dir, workers, Path(d), smg_binary, engine_flags)
        try:
            bench.start_workers()
            for turn in range(repeat):
                for policy in policies:
                    url, fronts = (bench.smg_front(policy[4:]) if policy.startswith("smg:")
                                   else bench.kvmesh_front(policy))
                    try:
                        model = asyncio.run(bench.wait_ready(url, fronts))
                        asyncio.run(_flush(bench.endpoints))
                        log.info("running %s, turn %d/%d (%d requests)", policy, turn + 1,
                                 repeat, len(prompts))
                        before, cpu = bench.engine_counters(), front_cpu_s(fronts)
                        results, wall = asyncio.run(_drive(url, model, prompts, timeout_s,
                                                           concurrency))
                        spent = [b - a for a, b in zip(cpu, front_cpu_s(fronts), strict=True)]
                        front_cpu[policy] = [a + b for a, b in zip_longest(
                            front_cpu[policy], spent, fillvalue=0.0)]
                        misses[policy] += explain_misses(bench.decision_log(policy), results,
                                                         per_request)
                        per_worker = counter_deltas(before, bench.engine_counters())
                        (Path(d) / f"requests-{policy.replace('/', '-')}-{turn}.json").write_text(
                            json.dumps(results))
                        raw[policy] += results
                        walls[policy] += wall
                        engines[policy].append(per_worker)
                        log.info("%s, turn %d: %s; per worker %s", policy, turn + 1,
                                 summarize(results, wall), per_worker)
                    finally:
                        for proc in fronts:
                            terminate(proc, 15)
        finally:
            bench.stop()
            kept = Path(tempfile.gettempdir()) / "kvmesh-real-bench-logs"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(d, kept, ignore=shutil.ignore_patterns("*-kv", "*-kvr"))
    return {policy: {**summarize(raw[policy], walls[policy]), "oracle_hit_rate": oracle,
                     "turns": repeat, "per_worker_by_turn": engines[policy],
                     **front_cpu_per_request(policy, front_cpu[policy], len(raw[policy])),
                     **({"misses": tally(misses[policy],
                                         int(sum(r["prompt"] for r in raw[policy])),
                                         len(misses[policy]))} if misses[policy] else {})}
            for policy in policies}
