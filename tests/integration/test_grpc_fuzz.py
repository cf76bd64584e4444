"""hypothesis fuzzing of every gRPC service kvmesh serves: the router (``Router``), a
worker with the fake engine (``VllmEngine``), the gateway's ``Inference`` API and the
edge's ADS server. Each method gets random messages of its request type and byte-level
mutations of them (often no valid protobuf at all); every answer must be OK or a
status that says what is wrong — never UNKNOWN (an exception escaped a handler) or
INTERNAL — and kvmesh's own refusals carry google.rpc.Status details.

The services run in this process on one event loop in a thread (fast, and a crash is
visible as a status, not a dead process); the calls are plain synchronous stubs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2
from google.protobuf import descriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from smg_grpc_proto import vllm_engine_pb2

from kvmesh.core.config import GatewayConfig, RouterConfig, WorkerConfig
from kvmesh.core.internal_auth import token_metadata
from kvmesh.core.security_config import SecurityConfig
from kvmesh.edge.control_plane import EdgeControlPlane
from kvmesh.edge.resources import Gateway
from kvmesh.gateway.server import GatewayServer
from kvmesh.router.server import RouterServer
from kvmesh.v1 import inference_pb2, router_pb2
from kvmesh.worker.worker import WorkerServer
from tests.proto_fuzz import check_error, messages, mutated

pytestmark = pytest.mark.integration
#: Random and as many mutated messages per method; KVMESH_GRPC_FUZZ_CASES raises it.
CASES = int(os.environ.get("KVMESH_GRPC_FUZZ_CASES", "150"))
#: Same cases on every run (CI stays deterministic); KVMESH_FUZZ_EXPLORE=1 draws new ones.
DERANDOMIZE = os.environ.get("KVMESH_FUZZ_EXPLORE") != "1"
CALL_TIMEOUT_S = 3.0
MODEL = "SmolLM2-135M-Instruct"
T = TypeVar("T")


class LoopThread:
    """An event loop in a thread, hosting the services under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Services:
    def __init__(self, run_dir: Path) -> None:
        self.router = RouterServer(RouterConfig(port=0, metrics_port=None, probe_interval_s=0.2))
        self.run_dir = run_dir
        self.worker: WorkerServer | None = None
        self.gateway: GatewayServer | None = None
        self.edge = EdgeControlPlane("127.0.0.1:1")
        self.targets: dict[str, str] = {}

    async def start(self) -> None:
        router = await self.router.start()
        self.worker = WorkerServer(WorkerConfig(
            engine_kind="fake", run_dir=self.run_dir, router=router, fake_token_delay_s=0,
            metrics_port=None, engine={"max_model_len": 512}))
        worker = await self.worker.start()
        await self.worker.wait_registered()
        self.gateway = GatewayServer(GatewayConfig(
            router=router, port=0, grpc_port=0, register_with_router=False,
            request_timeout_s=CALL_TIMEOUT_S))
        gateway = await self.gateway.start()
        while not self.gateway.core.ready_models():
            await asyncio.sleep(0.05)
        edge = await self.edge.start()
        await self.edge.set_gateways([Gateway(http="127.0.0.1:2", grpc="127.0.0.1:3")])
        self.targets = {"router": router, "worker": worker["endpoint"],
                        "gateway": gateway["grpc"], "edge": edge}

    async def stop(self) -> None:
        await self.edge.stop()
        for service in (self.gateway, self.worker, self.router):
            if service is not None:
                await service.stop()


@pytest.fixture(scope="module")
def services(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    loop = LoopThread()
    running = Services(tmp_path_factory.mktemp("fuzz"))
    try:
        loop.run(running.start())
        yield running
    finally:
        loop.run(running.stop())
        loop.close()


SERVICES: dict[str, descriptor.ServiceDescriptor] = {
    "router": router_pb2.DESCRIPTOR.services_by_name["Router"],
    "worker": vllm_engine_pb2.DESCRIPTOR.services_by_name["VllmEngine"],
    "gateway": inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    "edge": ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"],
}
#: The router dials what RegisterWorker names: fuzzed endpoints stay on loopback (a
#: mutated host name would be resolved through DNS), so that method gets random
#: messages with loopback endpoints and no byte mutations.
LOOPBACK_ONLY = {("router", "RegisterWorker")}
LOOPBACK_ENDPOINTS = st.sampled_from(
    ["", "127.0.0.1", "127.0.0.1:1", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:port",
     "[::1]:1", ":1", "127.0.0.1:1:2"])


def _payloads(service: str, method: descriptor.MethodDescriptor) -> st.SearchStrategy[bytes]:
    valid = messages(method.input_type)
    if "model" in method.input_type.fields_by_name:
        # Random model names only reach NOT_FOUND: half the requests name the served
        # model, so their other fields reach the pipeline.
        valid = st.tuples(valid, st.booleans()).map(_served_model)
    if (service, method.name) in LOOPBACK_ONLY:
        return st.tuples(valid, LOOPBACK_ENDPOINTS).map(_with_endpoint)
    return st.one_of(valid.map(lambda m: m.SerializeToString()), mutated(valid))


def _served_model(pair: tuple[Any, bool]) -> Any:
    request, served = pair
    if served:
        request.model = MODEL
    return request


def _with_endpoint(pair: tuple[Any, str]) -> bytes:
    request, endpoint = pair
    request.worker.endpoint = endpoint
    request.worker.metrics_endpoint = ""
    request.worker.http_endpoint = ""
    return bytes(request.SerializeToString())


#: Streams that wait for news once they have sent what they have: read one answer.
ENDLESS = {"WatchWorkers", "StreamAggregatedResources", "SubscribeKvEvents"}


def _call(channel: grpc.Channel, path: str, method: descriptor.MethodDescriptor,
          payload: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
    """One call with raw bytes (no serializer: exactly what was generated goes out);
    streams are read for a few messages, then cancelled."""
    if method.client_streaming:
        stream = channel.stream_stream(path)(iter([payload, payload]), timeout=CALL_TIMEOUT_S,
                                             metadata=metadata)
    elif method.server_streaming:
        stream = channel.unary_stream(path)(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
    else:
        channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
        return
    for _ in itertools.islice(stream, 1 if method.name in ENDLESS else 50):
        pass
    stream.cancel()


def _fuzz_method(channel: grpc.Channel, service: str, method: descriptor.MethodDescriptor,
                 metadata: tuple[tuple[str, str], ...], outcomes: Counter[str]) -> None:
    path = f"/{SERVICES[service].full_name}/{method.name}"

    @given(payload=_payloads(service, method))
    @settings(max_examples=2 * CASES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def fuzz(payload: bytes) -> None:
        try:
            _call(channel, path, method, payload, metadata)
            outcomes["OK"] += 1
        except grpc.RpcError as error:
            outcomes[check_error(error, f"{path} {payload!r}").name] += 1

    fuzz()


def test_no_handler_crashes_on_random_or_mutated_messages(services: Services) -> None:
    token = token_metadata(SecurityConfig().internal_token)
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    started = time.monotonic()
    for service, desc in SERVICES.items():
        with grpc.insecure_channel(services.targets[service]) as channel:
            for method in desc.methods:
                _fuzz_method(channel, service, method, token if service == "router" else (),
                             outcomes[service])
    elapsed = time.monotonic() - started
    for service, counts in outcomes.items():
        print(f"{service}: {sum(counts.values())} calls over "
              f"{len(SERVICES[service].methods)} methods, {dict(counts.most_common())}")
    print(f"total {sum(sum(c.values()) for c in outcomes.values())} calls in {elapsed:.0f}s, "
          "0 UNKNOWN/INTERNAL")
    # Every service answered both ways: some calls served, some refused.
    for service, counts in outcomes.items():
        assert counts["OK"] > 0 and counts["INVALID_ARGUMENT"] > 0, (service, counts)


def test_registration_without_token_is_refused_with_details(services: Services) -> None:
    with grpc.insecure_channel(services.targets["router"]) as channel:
        for method in ("RegisterWorker", "Heartbeat", "DeregisterWorker"):
            path = f"/{SERVICES['router'].full_name}/{method}"
            request = SERVICES["router"].methods_by_name[method].input_type
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(path)(b"", timeout=CALL_TIMEOUT_S)
            assert check_error(refused.value, request.name) == grpc.StatusCode.UNAUTHENTICATED
