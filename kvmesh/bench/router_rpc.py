"""`kvmesh bench router --rpc`: Route decisions per second through a real router
process, and their latency at that rate.

The router is ``python -m kvmesh.router`` pinned to one core. Its prefix index holds
``blocks`` blocks over 16 or 256 workers before the first call: the benchmark fills an
index with the same code the router uses, writes it as the router's own snapshot, and
the router restores each worker's part when it registers (the path a restarted router
takes). Every worker id is served by one fake-engine worker process (its GetLoads,
GetModelInfo, a live lease), so the router polls and follows 16 or 256 workers as it
would in a fleet. The load comes from ``kvmesh.bench.route_load`` on the other core:
packed 8k-token prompts (half a cached chain, half fresh), each Route followed by its
RequestFinished, closed loop (the most it answers) and at a fixed rate (latency there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.bench.route_load import TRANSPORTS
from kvmesh.bench.router import BS, chains_of, fill, prompt_of
from kvmesh.core.config import RouterConfig
from kvmesh.core.grpc_util import internal_channel
from kvmesh.core.internal_auth import token_metadata
from kvmesh.core.processes import dying_with_parent, terminate
from kvmesh.core.security_config import SecurityConfig
from kvmesh.core.settings import dump_settings
from kvmesh.launch.procs import wait_ready_file
from kvmesh.router.prefix_index import PrefixIndex, pack_views
from kvmesh.router.snapshot import capture, write
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

#: The model the fake worker serves (its embedded default).
MODEL = "SmolLM2-135M-Instruct"


def pinned(args: list[str], cores: set[int] | None) -> list[str]:
    """``args`` run on ``cores`` when given (util-linux ``taskset``: no Python between
    fork and exec, which a parent running gRPC threads must not have)."""
    return ["taskset", "-c", ",".join(map(str, sorted(cores))), *args] if cores else args


def spawn(args: list[str], log_path: Path, cores: set[int] | None) -> subprocess.Popen[bytes]:
    """A child process, on ``cores`` when given, that dies with this one."""
    argv, preexec = dying_with_parent(pinned(args, cores))
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=preexec)


@contextlib.contextmanager
def running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        terminate(proc)


def cores() -> tuple[set[int] | None, set[int] | None]:
    """(router's core, load's cores): the first core alone for the router when the
    machine has two or more."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


async def _incarnation(endpoint: str) -> float:
    async with internal_channel(endpoint) as channel:
        stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        info = await stub.GetServerInfo(vllm_engine_pb2.GetServerInfoRequest(), timeout=10)
        return time.time() - info.uptime_seconds


def write_snapshot(index: PrefixIndex, path: Path, incarnation: float) -> None:
    views = pack_views(index.export_views())
    write(path, capture(views, dict.fromkeys(views, incarnation)))


async def register(router: str, endpoint: str, worker_ids: list[str], blocks: int,
                   token: SecretStr | None = None, timeout_s: float = 120.0) -> int:
    """Register every worker id at ``endpoint``; wait until the index holds ``blocks``
    (restored from the snapshot); return the blocks indexed."""
    async with internal_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for wid in worker_ids:
            await stub.RegisterWorker(router_pb2.RegisterWorkerRequest(
                worker=common_pb2.WorkerInfo(worker_id=wid, endpoint=endpoint, block_size=BS,
                                             self_registered=False)), timeout=30,
                metadata=token_metadata(token))
        deadline = time.monotonic() + timeout_s
        while True:
            listed = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=30)
            held = sum(w.indexed_blocks for w in listed.workers)
            if held >= blocks or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.5)


def load(target: str, prompts: Path, run_dir: Path, cpus: set[int] | None,
         extra: list[str]) -> dict[str, Any]:
    out = run_dir / "load.json"
    with open(out, "wb") as f:
        proc = subprocess.run(
            pinned([sys.executable, "-m", "kvmesh.bench.route_load", "--target", target,
                    "--prompts", str(prompts), "--model", MODEL, *extra], cpus),
            stdout=f, stderr=subprocess.PIPE, timeout=600, check=False)
    if proc.returncode:
        raise RuntimeError(f"route_load failed: {proc.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, target: str, prompts: Path, run_dir: Path, cpus: set[int] | None,
             extra: list[str]) -> dict[str, Any]:
    """One load run, with the router's CPU time over it: decisions per CPU-second is
    what one core of its own would answer, however busy the shared machine is."""
    before, started = cpu_seconds(pid), time.monotonic()
    result = load(target, prompts, run_dir, cpus, extra)
    used = cpu_seconds(pid) - before
    result["router_busy"] = round(used / (time.monotonic() - started), 3)
    result["router_cpu_s"] = round(used, 2)
    result["decisions_per_router_cpu_s"] = round(result["decisions"] / max(used, 1e-9), 1)
    return result


def prompts_file(chains: list[np.ndarray], tokens: int, count: int, seed: int,
                 path: Path) -> Path:
    rng = random.Random(seed)
    np.save(path, np.stack([prompt_of(chains, tokens, i, rng) for i in range(count)]))
    return path


def run_fleet(n_workers: int, blocks: int, chains: list[np.ndarray], run_dir: Path,
              worker: str, incarnation: float, prompts: Path, settings: dict[str, Any]
              ) -> dict[str, Any]:
    """One router over ``n_workers`` workers holding ``blocks``: per round and transport
    (taking turns), the closed-loop rate, then the latency at a fixed rate
    (``settings['rate']``, else 80% of the first closed loop's, the same for every
    transport)."""
    router_core, load_cores = cores()
    ids = [f"w{i:03d}" for i in range(n_workers)]
    index = PrefixIndex()
    fill(index, chains, ids)
    snap = run_dir / f"index-{n_workers}.npz"
    write_snapshot(index, snap, incarnation)
    del index
    token = SecretStr(secrets.token_urlsafe(16))  # this run's router alone takes it
    config = RouterConfig(port=0, metrics_port=0, snapshot_path=snap,
                          snapshot_interval_s=86_400, snapshot_max_age_s=86_400,
                          security=SecurityConfig(internal_token=token))
    cfg = dump_settings(config, run_dir / f"router-{n_workers}.json")
    ready = run_dir / f"router-{n_workers}.ready"
    proc = spawn([sys.executable, "-m", "kvmesh.router", "--config", str(cfg),
                  "--ready-file", str(ready)], run_dir / f"router-{n_workers}.log", router_core)
    runs: list[dict[str, Any]] = []
    with running(proc):
        target = wait_ready_file(ready, 120, proc, "router")["grpc"]
        held = asyncio.run(register(target, worker, ids, blocks, token))
        common = ["--concurrency", str(settings["concurrency"]),
                  "--duration-s", str(settings["duration_s"])]
        if not settings["finish"]:
            common.append("--no-finish")
        transports = settings["transports"]
        load(target, prompts, run_dir, load_cores,
             [*common[:2], "--duration-s", "3", "--transport", transports[0]])
        quiet = ["--warmup-s", "0"]
        rate = settings["rate"]
        for round_ in range(settings["rounds"]):
            for transport in transports if round_ % 2 == 0 else transports[::-1]:
                args = [*common, *quiet, "--transport", transport]
                closed = measured(proc.pid, target, prompts, run_dir, load_cores, args)
                rate = rate or round(0.8 * closed["decisions_per_s"])
                fixed = measured(proc.pid, target, prompts, run_dir, load_cores,
                                 [*args, "--rate", str(rate)])
                runs.append({"transport": transport, "round": round_, "saturated": closed,
                             "at_fixed_rate": fixed})
    return {"workers": n_workers, "indexed_blocks": held, "runs": runs}


def run_router_rpc_bench(blocks: int = 1_000_000, fleets: tuple[int, ...] = (16, 256),
                         concurrency: int = 64, duration_s: float = 10.0, rate: float = 0.0,
                         prompt_tokens: int = 8192, finish: bool = True,
                         transports: tuple[str, ...] = ("stream",), rounds: int = 1,
                         seed: int = 0) -> dict[str, Any]:
    """``transports``: how the load reaches the router (``route_load.TRANSPORTS``),
    measured in turns against the same router, ``rounds`` times."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown or not transports:
        raise ValueError(f"transports must be among {sorted(TRANSPORTS)}, not "
                         f"{sorted(unknown) or 'none'}")
    settings = {"concurrency": concurrency, "duration_s": duration_s, "rate": rate,
                "finish": finish, "transports": list(transports), "rounds": rounds}
    report: dict[str, Any] = {
        "blocks": blocks, "prompt_tokens": prompt_tokens, "block_size": BS,
        "router_cores": sorted(cores()[0] or []), "load_avg_before": os.getloadavg(),
        "settings": settings, "fleets": []}
    chains = chains_of(blocks, seed)
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-rpc-") as tmp:
        run_dir = Path(tmp)
        prompts = prompts_file(chains, prompt_tokens, 256, seed, run_dir / "prompts.npy")
        ready = run_dir / "worker.ready"
        worker_proc = spawn(
            [sys.executable, "-m", "kvmesh.worker", "--no-ray", "--engine-kind", "fake",
             "--block-size", str(BS), "--port", "0", "--ready-file", str(ready),
             "--run-dir", str(run_dir)], run_dir / "worker.log", cores()[1])
        with running(worker_proc):
            endpoint = wait_ready_file(ready, 120, worker_proc, "fake worker")["endpoint"]
            incarnation = asyncio.run(_incarnation(endpoint))
            for n in fleets:
                report["fleets"].append(run_fleet(n, blocks, chains, run_dir, endpoint,
                                                  incarnation, prompts, settings))
    report["load_avg_after"] = os.getloadavg()
    warning = rt_throttle_warning(report)
    if warning:
        report["warning"] = warning
    return report


def rt_throttle_warning(report: dict[str, Any]) -> str:
    """Under a real-time policy (``chrt -f``, inherited by the router) Linux runs
    real-time tasks at most ``sched_rt_runtime_us`` of every ``sched_rt_period_us``
    (950 ms of each second by default): a router busier than that on its core is
    parked for the rest of each second, a stall that lands in the latency tail."""
    if os.sched_getscheduler(0) not in (os.SCHED_FIFO, os.SCHED_RR):
        return ""
    try:
        runtime = int(Path("/proc/sys/kernel/sched_rt_runtime_us").read_text())
        period = int(Path("/proc/sys/kernel/sched_rt_period_us").read_text())
    except (OSError, ValueError):
        return ""
    cap = runtime / period if runtime >= 0 else 1.0
    busy = max((run.get("router_busy", 0.0) for fleet in report["fleets"]
                for turn in fleet["runs"]
                for run in (turn["saturated"], turn["at_fixed_rate"])), default=0.0)
    if busy < cap - 0.05:
        return ""
    return (f"real-time scheduling: the kernel runs real-time tasks at most {cap:.0%} of "
            f"each second and the router was {busy:.0%} busy; the pause it is then given "
            "each second is in the latency tail (run without chrt)")

