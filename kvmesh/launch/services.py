"""The services around a mesh's pools: router, gateways, edge, admin service, Ray.

``MeshServices`` starts and stops them for ``MeshApp`` (``kvmesh.launch.app``): the
router first (workers register with it), then — once the pools serve — the gateway
replicas, Envoy with ``edge``, and the admin service; the front goes down before the
pools, the router and a Ray of our own after them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import time
from typing import TYPE_CHECKING, Any

import grpc
import httpx
from pydantic import SecretStr

from kvmesh.core.config import RouterConfig, dump_settings
from kvmesh.core.grpc_util import internal_channel, use_security
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from kvmesh.v1 import router_pb2, router_pb2_grpc

if TYPE_CHECKING:
    from pathlib import Path

    from kvmesh.launch.admin import ManagedPools

log = logging.getLogger(__name__)

#: How long a started worker may take to show up in the router's ListWorkers.
REGISTER_TIMEOUT_S = 60.0


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


def with_mesh_security(config: MeshConfig) -> MeshConfig:
    """One internal token for the whole mesh (the first one configured, else a random
    one made here), and the mesh-wide TLS files, when set, in every service's config."""
    sections = ("router", "gateway", "worker")
    own = [getattr(config, name).security for name in sections]
    tokens = [s.internal_token for s in ([config.security] if config.security else []) + own]
    token = next((t for t in tokens if t is not None), None)
    token = token or SecretStr(secrets.token_urlsafe(32))
    return config.model_copy(update={name: getattr(config, name).model_copy(update={
        "security": (config.security or section).model_copy(update={"internal_token": token})})
        for name, section in zip(sections, own, strict=True)})


async def wait_registered(router: str, model: str, worker_ids: set[str],
                          timeout_s: float = REGISTER_TIMEOUT_S) -> None:
    """Until the router lists every one of ``worker_ids`` under ``model``."""
    deadline = time.monotonic() + timeout_s
    async with internal_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while True:
            try:
                reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(model=model),
                                               timeout=5)
                if worker_ids <= {s.worker.worker_id for s in reply.workers}:
                    return
            except grpc.aio.AioRpcError as exc:
                log.debug("ListWorkers: %s", exc.code().name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers of {model} never registered with the router")
            await asyncio.sleep(0.05)


async def wait_models(base_url: str, models: set[str], timeout_s: float = 120) -> None:
    """Ready means the gateway can tokenize for every model (GET /health)."""
    deadline = time.monotonic() + timeout_s
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


def router_configs(config: MeshConfig, run_dir: Path) -> list[RouterConfig]:
    """Each router replica's settings: free ports unless set (the first replica keeps
    a set port), and a snapshot file of its own, in the run dir unless one is set."""
    configs = []
    for i in range(config.routers):
        router = config.router
        for port_field in ("port", "metrics_port"):
            if i > 0 or port_field not in router.model_fields_set:
                router = router.model_copy(update={port_field: 0})
        path = router.snapshot_path or run_dir / "router-snapshot.npz"
        if config.routers > 1:
            path = path.with_name(f"{path.stem}-{i}{path.suffix}")
        configs.append(router.model_copy(update={"snapshot_path": path}))
    return configs


class MeshServices:
    def __init__(self, config: MeshConfig, run_dir: Path) -> None:
        self.config = with_mesh_security(with_mesh_observability(config))
        # This process dials the router too (registrations awaited, the autoscaler).
        use_security(self.config.router.security)
        self.run_dir = run_dir
        self.router = ""
        self.http = ""
        self.grpc = ""
        self.admin: str | None = None
        #: Every router replica's address (``MeshConfig.routers``); ``router`` is the first.
        self.routers: list[str] = []
        self._routers: list[subprocess.Popen[bytes]] = []
        self._router_ready: dict[str, Any] = {}
        self._gateways: list[subprocess.Popen[bytes]] = []
        self._gateway_infos: list[dict[str, Any]] = []
        self._edge: Any = None  # kvmesh.launch.edge.RunningEdge with MeshConfig.edge
        self._admin: grpc.aio.Server | None = None
        self._ray = False

    async def start_router(self) -> str:
        """``routers`` replicas (the first on router.port when set, the rest on free
        ports), each snapshotting its index to a file of its own; returns what a worker
        is given: every replica's address, comma-separated."""
        for i, router_cfg in enumerate(router_configs(self.config, self.run_dir)):
            name = "router" if i == 0 else f"router-{i}"
            ready = self.run_dir / f"{name}.ready"
            proc = spawn_module(
                "kvmesh.router",
                ["--config", str(dump_settings(router_cfg, self.run_dir / f"{name}.json")),
                 "--ready-file", str(ready)],
                self.run_dir / f"{name}.log",
            )
            self._routers.append(proc)
            info = await asyncio.to_thread(wait_ready_file, ready, 60, proc, name)
            self._router_ready = self._router_ready or info
            self.routers.append(str(info["grpc"]))
        self.router = self.routers[0]
        log.info("router(s) up at %s", ", ".join(self.routers))
        return ",".join(self.routers)

    def init_ray(self, verbose: bool) -> None:
        from kvmesh.worker.actor import init_ray

        init_ray(self.config.ray_address, None, verbose)
        self._ray = True

    def free_cpus(self) -> float:
        """CPUs the Ray cluster has not handed out."""
        import ray

        return float(ray.available_resources().get("CPU", 0.0))

    async def start_gateways(self, models: set[str]) -> None:
        """``gateways`` replicas (behind the edge, or past the first, on free ports),
        each ready for every one of ``models``; then the edge."""
        cfg = self.config
        for i in range(cfg.gateways):
            gateway_cfg = cfg.gateway
            own_ports = i == 0 and not cfg.edge.enabled
            if not own_ports or "grpc_port" not in gateway_cfg.model_fields_set:
                gateway_cfg = gateway_cfg.model_copy(update={"grpc_port": 0})
            if not own_ports:
                gateway_cfg = gateway_cfg.model_copy(update={"port": 0})
            ready = self.run_dir / f"gateway-{i}.ready"
            gateway_cfg = gateway_cfg.model_copy(update={
                "router": self.router, "routers": self.routers, "ready_file": ready})
            if cfg.edge.picker:  # every gateway answers Envoy's ext_proc and is listed
                gateway_cfg = gateway_cfg.model_copy(
                    update={"endpoint_picker": True, "register_with_router": True})
            proc = spawn_module(
                "kvmesh.gateway",
                ["--config", str(dump_settings(gateway_cfg, self.run_dir / f"gateway-{i}.json"))],
                self.run_dir / ("gateway.log" if i == 0 else f"gateway-{i}.log"),
            )
            self._gateways.append(proc)
            self._gateway_infos.append(
                await asyncio.to_thread(wait_ready_file, ready, 120, proc, "gateway"))
        for replica in self._gateway_infos:
            await wait_models(replica["http"], models)
        self.http, self.grpc = self._gateway_infos[0]["http"], self._gateway_infos[0]["grpc"]
        if cfg.edge.enabled:
            from kvmesh.edge.resources import Gateway
            from kvmesh.launch.edge import start_edge

            self._edge = await start_edge(
                cfg.edge, cfg.gateway.host, cfg.gateway.port,
                [Gateway(g["http"].removeprefix("http://").removesuffix("/v1"), g["grpc"])
                 for g in self._gateway_infos], self.run_dir)
            self.http, self.grpc = f"http://{self._edge.address}/v1", self._edge.address

    async def start_admin(self, pools: ManagedPools) -> None:
        if self.config.admin_port is None:
            return
        from kvmesh.launch.admin import start_admin_server

        self._admin, self.admin = await start_admin_server(
            pools, self.config.gateway.host, self.config.admin_port)
        log.info("mesh admin service at %s", self.admin)

    def state(self) -> dict[str, Any]:
        edge = self._edge
        return {
            "http": self.http, "grpc": self.grpc, "gateways": self._gateway_infos,
            "edge": {"address": edge.address, "admin": edge.admin,
                     "control_plane": edge.control_plane.address} if edge else None,
            "router": self.router,
            "routers": self.routers,
            "router_metrics": self._router_ready.get("metrics", ""),
            # Where `kvmesh status` finds the certificate it dials the router with.
            "tls": self.config.router.security.tls.model_dump(mode="json")
            if self.config.router.security.tls else None,
            "admin": self.admin,
        }

    def pids(self) -> dict[str, Any]:
        return {
            "router": self._routers[0].pid if self._routers else -1,
            "routers": [p.pid for p in self._routers],
            "gateway": self._gateways[0].pid if self._gateways else -1,
            "gateways": [p.pid for p in self._gateways],
            **({"edge": self._edge.envoy.pid} if self._edge else {}),
        }

    async def stop_front(self) -> None:
        """The edge, the admin service and the gateways (before the pools stop)."""
        if self._edge is not None:
            await self._edge.stop()
            self._edge = None
        if self._admin is not None:
            await self._admin.stop(grace=1.0)
            self._admin = None
        # Each drains (streams in flight finish, up to its drain_timeout_s): together.
        drain_s = self.config.gateway.drain_timeout_s + 10
        await asyncio.gather(*(asyncio.to_thread(terminate, proc, drain_s)
                               for proc in self._gateways))
        self._gateways = []

    async def stop_back(self) -> None:
        """A Ray of our own, then the router (after the pools stopped)."""
        if self._ray and self.config.ray_address is None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        self._ray = False
        drain_s = self.config.router.drain_timeout_s + 10
        await asyncio.gather(*(asyncio.to_thread(terminate, proc, drain_s)
                               for proc in self._routers))
        self._routers = []
