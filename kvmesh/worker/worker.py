"""One worker: an engine (real vLLM, or the fake for tests) served over VllmEngine.

The same class runs inside a Ray actor (services/actor.py) or a plain process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.core.config import WorkerConfig
from kvmesh.core.drain import InflightCalls, not_serving, wait_idle
from kvmesh.core.errors import InvalidRequestError
from kvmesh.core.grpc_util import (
    add_health_and_reflection,
    bind,
    create_server,
    set_serving,
    use_security,
)
from kvmesh.core.malloc_tuning import tune_malloc
from kvmesh.core.metrics_http import MetricsEndpoint
from kvmesh.core.net import bindable, free_port
from kvmesh.core.processes import renice, terminate
from kvmesh.core.registration import Registration
from kvmesh.core.roles import WorkerRole, role_to_proto
from kvmesh.core.service_main import freeze_heap, write_ready_file
from kvmesh.models.source import resolve_model
from kvmesh.models.source import served_name as default_served_name
from kvmesh.v1 import common_pb2, worker_pb2_grpc
from kvmesh.worker import reaper
from kvmesh.worker.engine_args import (
    dp_socket_links,
    engine_env,
    engine_kwargs,
    kv_transfer_config,
    nixl_side_channel,
)
from kvmesh.worker.kv_fanout import KvEventFanout
from kvmesh.worker.lora import AdapterManager, LoraEngine
from kvmesh.worker.lora_servicer import SERVICE_NAME as LORA_SERVICE_NAME
from kvmesh.worker.lora_servicer import LoraAdaptersServicer

log = logging.getLogger(__name__)
SERVICE_NAME = vllm_engine_pb2.DESCRIPTOR.services_by_name["VllmEngine"].full_name


def with_side_channel(config: WorkerConfig) -> WorkerConfig:
    """Give a NIXL prefill/decode worker a free side-channel port when it has none; one
    it was given must be free (vLLM's NIXL listener dies on a taken port and its engine
    then never finishes starting)."""
    kv = config.kv_transfer
    if config.role == WorkerRole.both or kv.connector != "nixl":
        return config
    if kv.side_channel_port:
        if not bindable(kv.side_channel_host, kv.side_channel_port):
            raise InvalidRequestError(
                f"kv_transfer.side_channel_port {kv.side_channel_port} is in use on "
                f"{kv.side_channel_host}: give each engine on a host its own, or 0 for a "
                "free one", param="kv_transfer.side_channel_port")
        return config
    port = free_port(kv.side_channel_host)
    return config.model_copy(
        update={"kv_transfer": kv.model_copy(update={"side_channel_port": port})})


def dp_registration(config: WorkerConfig) -> dict[str, Any]:
    """What the router learns of the worker's data-parallel gang (rank -1: none)."""
    engine = config.engine
    if engine.data_parallel_size <= 1 or engine.data_parallel_rank is None:
        return {"dp_rank": -1}
    return {"dp_rank": engine.data_parallel_rank, "dp_size": engine.data_parallel_size,
            "dp_group": engine.data_parallel_group}


def engine_parallel(engine: Any) -> dict[str, Any]:
    """The running engine's own parallel settings (its vllm_config, as the engine core
    got it): what `kvmesh up` reports, so a DP/EP setting is seen to reach the engine."""
    parallel = engine.vllm_config.parallel_config
    return {name: getattr(parallel, name) for name in (
        "data_parallel_size", "data_parallel_rank", "data_parallel_external_lb",
        "enable_expert_parallel", "tensor_parallel_size")}


def served_name(config: WorkerConfig, model_path: Path) -> str:
    if config.engine.served_model_name:
        return config.engine.served_model_name
    return default_served_name(config.engine.model, model_path)


class WorkerServer:
    def __init__(self, config: WorkerConfig, ready_file: Path | None = None) -> None:
        self.config = with_side_channel(config)
        use_security(config.security)
        self._ready_file = ready_file
        self._server: grpc.aio.Server | None = None
        self._engine: Any = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._kv_fanout: KvEventFanout | None = None
        self._registrations: list[Registration] = []
        self.adapters: AdapterManager | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._metrics: MetricsEndpoint | None = None
        self._health: Any = None
        self._vllm_health: Any = None
        #: Generations (and embeddings) in flight: what a drain waits for.
        self.inflight = InflightCalls(("Generate", "Embed"))
        self.metrics_endpoint = ""
        self.port = 0
        self.worker_id = ""
        self.model = ""

    @property
    def endpoint(self) -> str:
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    async def start(self) -> dict[str, Any]:
        """Bind, start the engine, serve, register. Returns what the caller needs."""
        tune_malloc()  # a Ray actor's process does not go through run_until_signalled
        config = self.config
        server = create_server([self.inflight])
        self.port = bind(server, config.host, config.port)
        self.worker_id = config.worker_id or self.endpoint
        # A bucket or hub model is fetched here once per node (other workers wait).
        model_path = await asyncio.to_thread(resolve_model, config.engine.model)
        self.model = served_name(config, model_path)
        config.run_dir.mkdir(parents=True, exist_ok=True)

        started = time.monotonic()
        if config.engine_kind == "fake":
            from kvmesh.worker.fake_engine import FakeLoraEngine, FakeVllmEngineServicer

            if config.fake_start_delay_s:
                log.info("fake engine loading for %.0f s", config.fake_start_delay_s)
                await asyncio.sleep(config.fake_start_delay_s)
            self.adapters = self._adapter_manager(FakeLoraEngine())
            servicer: Any = FakeVllmEngineServicer(
                self.model,
                model_path,
                token_delay_s=config.fake_token_delay_s,
                max_context_length=config.engine.max_model_len,
                block_size=config.engine.block_size or 32,
                side_channel=nixl_side_channel(config),
                output=config.fake_output,
                adapters=self.adapters,
            )
            health = add_health_and_reflection(server, [SERVICE_NAME, LORA_SERVICE_NAME])
        else:
            servicer, health = self._start_vllm(server, model_path)
        vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(servicer, server)
        worker_pb2_grpc.add_LoraAdaptersServicer_to_server(
            LoraAdaptersServicer(self.adapters, self.report_adapters), server)
        await server.start()
        if health is not None:
            await set_serving(health, [SERVICE_NAME])
        self._health = health if health is not None else self._vllm_health
        self._server = server
        if config.metrics_port is not None:
            self._start_metrics(config.metrics_port)
        # vLLM, torch and the engine client loaded: hundreds of thousands of objects a
        # full collection would walk while the token streams wait (as vLLM's own server).
        freeze_heap()
        log.info(
            "worker %s serving %s on %s (%s engine ready in %.1fs)",
            self.worker_id, self.model, self.endpoint, config.engine_kind,
            time.monotonic() - started,
        )
        # Every router replica gets the registration (and subscribes to the events).
        for router in filter(None, (r.strip() for r in (config.router or "").split(","))):
            registration = Registration(
                router,
                common_pb2.WorkerInfo(
                    worker_id=self.worker_id,
                    endpoint=self.endpoint,
                    model=self.model,
                    role=role_to_proto(config.role),
                    **dp_registration(config),
                    self_registered=True,
                    nixl_side_channel=nixl_side_channel(config),
                    kv_connector=config.kv_transfer.connector
                    if config.role != WorkerRole.both else "",
                    metrics_endpoint=self.metrics_endpoint,
                    routing_policy=config.routing_policy or "",
                    lora_slots=self.adapters.slots if self.adapters else 0,
                ),
                config.security.internal_token,
                config.registration_timeout_s,
                adapters=self._adapter_report if self.adapters else None,
            )
            registration.start()
            self._registrations.append(registration)
        info = {"worker_id": self.worker_id, "endpoint": self.endpoint, "model": self.model,
                "role": config.role.value, "nixl_side_channel": nixl_side_channel(config),
                "metrics": self.metrics_endpoint, **dp_registration(config)}
        if self._engine is not None:
            info["engine_parallel"] = engine_parallel(self._engine)
        write_ready_file(self._ready_file, info)
        return info

    def _adapter_manager(self, engine: LoraEngine) -> AdapterManager | None:
        lora = self.config.engine.lora
        if lora is None or not lora.enable_lora:
            return None
        return AdapterManager(lora, engine, resolve_model, on_change=self._adapters_changed)

    def _adapter_report(self) -> tuple[list[str], list[str]]:
        if self.adapters is None:
            return [], []
        return self.adapters.loaded(), self.adapters.servable()

    def _adapters_changed(self) -> None:
        """An adapter was loaded or evicted by a request: tell the routers now."""
        task = asyncio.get_running_loop().create_task(self.report_adapters())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def report_adapters(self) -> None:
        """Send every router this worker's adapters now (and wait until they have them)."""
        await asyncio.gather(*(r.report_now() for r in self._registrations))

    def _start_metrics(self, port: int) -> None:
        """Serve this process's Prometheus registry: with a vLLM engine, the `vllm:*`
        metrics its stat logger records in-process (the engine core subprocess sends
        its stats to this, the frontend, process; with PROMETHEUS_MULTIPROC_DIR set,
        vLLM's multiprocess registry)."""
        from prometheus_client import REGISTRY, CollectorRegistry

        registry: CollectorRegistry = REGISTRY
        if self._engine is not None:
            from vllm.v1.metrics.prometheus import get_prometheus_registry

            registry = get_prometheus_registry()
        self._metrics = MetricsEndpoint(self.config.host, port, registry)
        self._metrics.start()
        self.metrics_endpoint = (
            f"{self.config.advertise_host or self.config.host}:{self._metrics.port}")

    def _start_vllm(self, server: grpc.aio.Server, model_path: Path) -> tuple[Any, Any]:
        os.environ.update(engine_env(self.config))
        from grpc_health.v1 import health_pb2_grpc
        from grpc_reflection.v1alpha import reflection
        from smg_grpc_servicer.vllm.health_servicer import VllmHealthServicer
        from vllm.config import KVEventsConfig, KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from kvmesh.worker.lora import VllmLoraEngine
        from kvmesh.worker.vllm_servicer import KvmeshVllmEngineServicer

        kwargs = engine_kwargs(self.config, model_path, self.model, self.worker_id)
        for link, target in dp_socket_links(kwargs["kv_events_config"],
                                            kwargs.get("data_parallel_rank", 0)):
            link.unlink(missing_ok=True)
            link.symlink_to(target)  # connect() follows it to the rank's socket
        kwargs["kv_events_config"] = KVEventsConfig(**kwargs["kv_events_config"])
        if kv_transfer_config(self.config) is not None:
            kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
        before = {c.pid for c in psutil.Process().children()}
        engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**kwargs), usage_context=UsageContext.OPENAI_API_SERVER
        )
        self._engine = engine
        # The engine's processes end with this one, however it ends (reaper.py).
        engine_procs = [c for c in psutil.Process().children() if c.pid not in before]
        self._reaper = reaper.start(engine_procs)
        if renice(engine_procs, self.config.engine_nice):
            log.info("engine processes %s at niceness +%d (engine_nice)",
                     [p.pid for p in engine_procs], self.config.engine_nice)
        self.adapters = self._adapter_manager(VllmLoraEngine(engine))
        servicer = KvmeshVllmEngineServicer(engine, time.time(), self.adapters)
        self._kv_fanout = servicer.kv_fanout
        if self._kv_fanout is not None:  # follows the engine's events from its start
            self._kv_fanout.start()
        # vLLM's own health servicer reports the engine's real state.
        health = VllmHealthServicer(engine)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, LORA_SERVICE_NAME, "grpc.health.v1.Health",
             reflection.SERVICE_NAME], server
        )
        self._vllm_health = health
        return servicer, None

    async def wait_registered(self) -> None:
        for registration in self._registrations:
            await registration.registered.wait()

    async def drain(self) -> None:
        """NOT_SERVING, out of every router's routing set, generations in flight
        finish (up to ``drain_timeout_s``). The worker stays registered (and
        heartbeating) until ``stop`` deregisters it."""
        await not_serving(self._health)
        await asyncio.gather(*(r.drain() for r in self._registrations))
        await wait_idle(lambda: self.inflight.count, self.config.drain_timeout_s,
                        f"worker {self.worker_id}")

    async def stop(self) -> None:
        if self._server is not None:
            await self.drain()
        for registration in self._registrations:
            await registration.stop()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self._kv_fanout is not None:
            await self._kv_fanout.close()
            self._kv_fanout = None
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._reaper is not None:  # it exits once the engine is gone; now, at least
            terminate(self._reaper, 5.0)
            self._reaper = None
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
