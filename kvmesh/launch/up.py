"""`kvmesh up`: router + N worker actors (local Ray) + gateway on this machine."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from kvmesh.core.config import EngineConfig, MeshConfig, WorkerConfig, dump_settings
from kvmesh.core.roles import WorkerRole
from kvmesh.core.service_main import write_ready_file
from kvmesh.launch import placement
from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from kvmesh.launch.state import claim, default_state_file, release
from kvmesh.models.source import resolve_model

log = logging.getLogger(__name__)


def with_mesh_observability(config: MeshConfig) -> MeshConfig:
    """The mesh-wide tracing/logging settings, copied into every service's config."""
    shared = {k: v for k, v in (("tracing", config.tracing), ("logging", config.logging))
              if v is not None}
    if not shared:
        return config
    return config.model_copy(update={
        "router": config.router.model_copy(update=shared),
        "gateway": config.gateway.model_copy(update=shared),
        "worker": config.worker.model_copy(update=shared),
    })


def _worker_config(config: MeshConfig, router: str, run_dir: Path, name: str, role: WorkerRole,
                   engine: EngineConfig, cpu_bind: tuple[int, int]) -> WorkerConfig:
    """The worker template with one worker's name, role, engine and CPU binding.

    ``model_copy`` does not validate, so every value here is of the field's type (a role
    given as a string would warn when the config is serialised for the actor)."""
    from kvmesh.worker.engine_args import cpu_binding

    ncpus = os.cpu_count() or 1
    update: dict[str, Any] = {
        "router": router,
        "run_dir": run_dir,
        "worker_id": config.worker.worker_id and f"{config.worker.worker_id}-{name}",
        "num_cpus": min(config.worker.num_cpus, _cpu_share(config, ncpus)),
        "role": role,
        "engine": engine,
    }
    if config.worker.cpu_bind is None:
        update["cpu_bind"] = cpu_binding(cpu_bind[0], cpu_bind[1], ncpus)
    return config.worker.model_copy(update=update)


def worker_configs(config: MeshConfig, router: str, run_dir: Path) -> list[WorkerConfig]:
    """One WorkerConfig per chat worker (both, then prefill, then decode workers): disjoint
    CPU cores, the role's engine settings, the shared template otherwise."""
    roles = config.worker_roles()
    return [_worker_config(config, router, run_dir, str(i), role, engine, (i, len(roles)))
            for i, (role, engine) in enumerate(roles)]


def embedding_worker_configs(config: MeshConfig, router: str, run_dir: Path
                             ) -> list[WorkerConfig]:
    """Embedding workers: the worker template with the embedding model, pooling runner.

    An embedding forward pass is short and bursty, so these workers share every core
    with the chat workers instead of taking cores of their own.
    """
    emb = config.embeddings
    engine = config.worker.engine.model_copy(update={
        "model": emb.model,
        "served_model_name": None,
        "runner": "pooling",
        "max_model_len": emb.max_model_len,
        # Encoder-only models (BERT) have no KV cache to reuse; vLLM's scheduler
        # refuses to start them with prefix caching on.
        "enable_prefix_caching": False,
        "load_format": "auto",
        "lora": None,  # the chat model's adapters are not the embedding model's
    })
    return [_worker_config(config, router, run_dir, f"emb-{i}", WorkerRole.both, engine, (0, 1))
            for i in range(emb.workers)]


def _cpu_share(config: MeshConfig, ncpus: int) -> float:
    """Ray CPUs per worker actor: fractional when workers outnumber cores, so every
    actor (chat and embedding) can be scheduled — with the router's autoscale on, every
    pool at its largest."""
    workers = len(config.worker_roles())
    scale = config.router.autoscale
    if scale.enabled:
        workers = sum(max(n, scale.max_workers) for n in
                      (config.workers, config.prefill, config.decode) if n)
    return ncpus / (workers + config.embeddings.workers)


class LocalMesh:
    def __init__(self, config: MeshConfig, run_dir: Path | None = None,
                 verbose: bool = False) -> None:
        self.config = config
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="kvmesh-up-"))
        self.verbose = verbose
        self._router: subprocess.Popen[bytes] | None = None
        self._gateways: list[subprocess.Popen[bytes]] = []
        self._edge: Any = None  # kvmesh.launch.edge.RunningEdge with MeshConfig.edge
        self._actors: list[Any] = []
        self._group: Any = None  # the workers' placement group (MeshConfig.placement)
        self._scaling: Any = None  # kvmesh.launch.scaler.Scaling with router.autoscale
        self.state: dict[str, Any] = {}

    async def start(self) -> dict[str, Any]:
        started = time.monotonic()
        cfg = with_mesh_observability(self.config)
        # Fetched here, with the progress bar on the user's terminal; the workers then
        # find the model in this node's cache.
        model_path = await asyncio.to_thread(resolve_model, cfg.worker.engine.model)
        log.info("model ready at %s", model_path)
        lora = cfg.worker.engine.lora
        for name, source in (lora.adapters if lora and lora.enable_lora else {}).items():
            log.info("LoRA adapter %s ready at %s", name,
                     await asyncio.to_thread(resolve_model, source))
        if cfg.embeddings.workers:
            embedding_path = await asyncio.to_thread(resolve_model, cfg.embeddings.model)
            log.info("embedding model ready at %s", embedding_path)

        router_cfg = cfg.router
        for port_field in ("port", "metrics_port"):
            if port_field not in router_cfg.model_fields_set:
                router_cfg = router_cfg.model_copy(update={port_field: 0})
        ready = self.run_dir / "router.ready"
        self._router = spawn_module(
            "kvmesh.router",
            ["--config", str(dump_settings(router_cfg, self.run_dir / "router.json")),
             "--ready-file", str(ready)],
            self.run_dir / "router.log",
        )
        router_ready = await asyncio.to_thread(wait_ready_file, ready, 60, self._router, "router")
        router = router_ready["grpc"]
        log.info("router up at %s", router)

        from kvmesh.worker.actor import init_ray, spawn_worker_actor

        await asyncio.to_thread(init_ray, cfg.ray_address, None, self.verbose)
        configs = worker_configs(cfg, router, self.run_dir)
        embedding_configs = embedding_worker_configs(cfg, router, self.run_dir)
        everyone = configs + embedding_configs
        self._group = await asyncio.to_thread(
            placement.reserve, everyone, cfg.placement, cfg.startup_timeout_s)
        self._actors = [spawn_worker_actor(c, placement=placement.scheduling(self._group, i))
                        for i, c in enumerate(everyone)]
        log.info("starting %d worker(s) and %d embedding worker(s) (first start compiles; "
                 "see %s)", len(configs), len(embedding_configs), self.run_dir)
        started_workers = await asyncio.wait_for(
            asyncio.gather(*[a.start.remote() for a in self._actors]),
            timeout=cfg.startup_timeout_s,
        )
        workers = started_workers[: len(configs)]
        embedding_workers = started_workers[len(configs):]

        if cfg.router.autoscale.enabled:
            self._scaling = self._start_scaler(cfg, router, workers)
        gateways = await self._start_gateways(cfg, router)
        gateway = gateways[0]
        for replica in gateways:
            await self._wait_models(replica["http"], {w["model"] for w in started_workers})
        if cfg.edge.enabled:
            from kvmesh.edge.resources import Gateway
            from kvmesh.launch.edge import start_edge

            self._edge = await start_edge(
                cfg.edge, cfg.gateway.host, cfg.gateway.port,
                [Gateway(g["http"].removeprefix("http://").removesuffix("/v1"), g["grpc"])
                 for g in gateways], self.run_dir)
        edge = self._edge
        self.state = {
            "http": f"http://{edge.address}/v1" if edge else gateway["http"],
            "grpc": edge.address if edge else gateway["grpc"],
            "gateways": gateways,
            "edge": {"address": edge.address, "admin": edge.admin,
                     "control_plane": edge.control_plane.address} if edge else None,
            "router": router,
            "router_metrics": router_ready.get("metrics", ""),
            "workers": workers,
            "embedding_workers": embedding_workers,
            "pids": {
                "router": self._router.pid,
                "gateway": self._gateways[0].pid,
                "gateways": [p.pid for p in self._gateways],
                **({"edge": edge.envoy.pid} if edge else {}),
                "workers": [w["pid"] for w in started_workers],
            },
            "run_dir": str(self.run_dir),
            "startup_s": round(time.monotonic() - started, 1),
        }
        return self.state

    async def _start_gateways(self, cfg: MeshConfig, router: str) -> list[dict[str, Any]]:
        """``gateways`` replicas; behind the edge (or past the first) on free ports.
        ``cfg`` is the mesh config with the mesh-wide tracing/logging copied in."""
        started = []
        for i in range(cfg.gateways):
            gateway_cfg = cfg.gateway
            own_ports = i == 0 and not cfg.edge.enabled
            if not own_ports or "grpc_port" not in gateway_cfg.model_fields_set:
                gateway_cfg = gateway_cfg.model_copy(update={"grpc_port": 0})
            if not own_ports:
                gateway_cfg = gateway_cfg.model_copy(update={"port": 0})
            ready = self.run_dir / f"gateway-{i}.ready"
            gateway_cfg = gateway_cfg.model_copy(update={"router": router, "ready_file": ready})
            if cfg.edge.picker:  # every gateway answers Envoy's ext_proc and is listed
                gateway_cfg = gateway_cfg.model_copy(
                    update={"endpoint_picker": True, "register_with_router": True})
            proc = spawn_module(
                "kvmesh.gateway",
                ["--config", str(dump_settings(gateway_cfg, self.run_dir / f"gateway-{i}.json"))],
                self.run_dir / ("gateway.log" if i == 0 else f"gateway-{i}.log"),
            )
            self._gateways.append(proc)
            started.append(await asyncio.to_thread(wait_ready_file, ready, 120, proc, "gateway"))
        return started

    async def _wait_models(self, base_url: str, models: set[str]) -> None:
        """Ready means the gateway can tokenize for every model (GET /health)."""
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                try:
                    reply = await client.get(base_url.removesuffix("/v1") + "/health")
                    if reply.status_code == 200 and models <= set(reply.json()["models"]):
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"gateway never served {sorted(models)}")

    def _start_scaler(self, cfg: MeshConfig, router: str,
                      started: list[dict[str, Any]]) -> Any:
        """The router's autoscale on: each chat pool (role) becomes a RayPool owning its
        actors, and a Scaler follows the router's desired sizes."""
        from kvmesh.launch.scaler import RayPool, Scaling

        roles = cfg.worker_roles()
        pools = []
        for role in dict.fromkeys(r for r, _ in roles):
            members = [i for i, (r, _) in enumerate(roles) if r == role]
            engine = roles[members[0]][1]
            most = cfg.router.autoscale.bounds(started[members[0]]["model"], role.value)[1]

            def make(i: int, role: WorkerRole = role, engine: EngineConfig = engine,
                     most: int = most) -> WorkerConfig:
                return _worker_config(cfg, router, self.run_dir, f"{role.value}-{i}", role,
                                      engine, (i % most, most))

            pool = RayPool(make, started[members[0]]["model"], role.value)
            pool.adopt([self._actors[i] for i in members])
            pools.append(pool)
        owned = {id(a) for p in pools for a in p.actors}
        self._actors = [a for a in self._actors if id(a) not in owned]
        return Scaling.start(router, pools)

    async def stop(self) -> None:
        if self._scaling is not None:
            await self._scaling.stop()
            self._scaling = None
        if self._edge is not None:
            await self._edge.stop()
            self._edge = None
        # Each drains (streams in flight finish, up to its drain_timeout_s): together.
        cfg = self.config
        await asyncio.gather(*(
            asyncio.to_thread(terminate, proc, cfg.gateway.drain_timeout_s + 10)
            for proc in self._gateways))
        self._gateways = []
        if self._actors:
            import ray

            async def stop_actor(actor: Any) -> None:
                try:
                    await asyncio.wait_for(actor.stop.remote(),
                                           timeout=cfg.worker.drain_timeout_s + 15)
                except Exception as exc:  # a dead actor must not block shutdown
                    log.warning("worker stop failed: %s", exc)
                ray.kill(actor)

            await asyncio.gather(*(stop_actor(a) for a in self._actors))
            self._actors = []
        placement.release(self._group)
        self._group = None
        if self.config.ray_address is None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if self._router is not None:
            await asyncio.to_thread(terminate, self._router, cfg.router.drain_timeout_s + 10)


async def serve(config: MeshConfig, state_file: Path | None, verbose: bool) -> None:
    """Start the mesh, print where to send requests, run until Ctrl-C / SIGTERM.

    Its state (addresses, PIDs) goes to ``state_file`` or the default place
    (``kvmesh.launch.state``), where `kvmesh status` and `kvmesh down` find it."""
    import signal

    from rich.console import Console

    state_file = state_file or default_state_file()
    claim(state_file)
    console = Console(stderr=False)
    mesh = LocalMesh(config, verbose=verbose)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        start = asyncio.ensure_future(mesh.start())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            return
        state = {**start.result(), "pid": os.getpid()}
        stopper.cancel()
        write_ready_file(state_file, state)
        console.print(
            f"[bold green]kvmesh is up[/] in {state['startup_s']}s — "
            f"{len(state['workers'])} worker(s) serving "
            f"{', '.join(sorted({w['model'] for w in state['workers']}))}"
            + "".join(f", {len(state['embedding_workers'])} embedding worker(s) serving {m}"
                      for m in sorted({w['model'] for w in state['embedding_workers']}))
            + "\n"
            f"  OpenAI API:     [bold]{state['http']}[/]\n"
            f"  gRPC Inference: {state['grpc']}\n"
            f"  router:         {state['router']}\n"
            + (f"  Envoy (xDS):    admin http://{state['edge']['admin']}, control plane "
               f"{state['edge']['control_plane']}, {len(state['gateways'])} gateway(s)\n"
               if state["edge"] else "")
            + f"  logs:           {state['run_dir']}\n"
            f"  state:          {state_file} (`kvmesh status`, `kvmesh down`)\n"
            "Press Ctrl-C to stop."
        )
        await stop.wait()
        console.print("stopping kvmesh ...")
    finally:
        await mesh.stop()
        release(state_file)
    console.print("kvmesh stopped.")
