"""Mutual TLS between the mesh's own services, on real processes (router, fake-engine
worker, gateway) with certificates made in the test: every internal hop works over
mTLS, and a client without a certificate of the mesh's CA is refused by the router
and by the worker; the router's mutating RPCs also demand the internal token."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from kvmesh.core.internal_auth import TOKEN_METADATA_KEY
from kvmesh.launch.procs import spawn_module
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.certs import Pki, make_pki

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
SERVICES = ("ROUTER", "WORKER", "GATEWAY")


def tls_env(pki: Pki) -> dict[str, str]:
    """Every service's ``security.tls`` from the environment (as a deployment would)."""
    return {f"KVMESH_{service}_SECURITY__TLS__{field.upper()}": value
            for service in SERVICES for field, value in pki.tls().items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_mesh(model_dir: Path, pki: Pki) -> Iterator[Mesh]:
    with pytest.MonkeyPatch.context() as patch, running_mesh("kvm-tls-") as mesh:
        for key, value in tls_env(pki).items():
            patch.setenv(key, value)
        mesh.router = start_router(mesh)
        mesh.workers = [mesh.start_worker("w0")]
        mesh.start_gateway()
        yield mesh


def credentials(pki: Pki, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)


def mesh_channel(pki: Pki, target: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, credentials(pki, pki.cert, pki.key))


async def health(channel: grpc.aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_every_internal_hop_runs_over_mtls(tls_mesh: Mesh, pki: Pki) -> None:
    """A request through the gateway reaches the router and the worker; the worker and
    the gateway registered over mTLS with the token; the router probes the worker's
    load over mTLS (the same channel its KV-event follower uses)."""
    prompt = "Tell me everything about mutual TLS between services. " * 8
    reply = httpx.post(f"{tls_mesh.http}/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": prompt}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4

    async def router_view() -> tuple[router_pb2.ListWorkersResponse, router_pb2.WorkerSet]:
        async with mesh_channel(pki, tls_mesh.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            workers = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
            watch = stub.WatchWorkers(router_pb2.WatchWorkersRequest(), timeout=5)
            first = await watch.read()
            watch.cancel()
            return workers, first

    workers, first = asyncio.run(router_view())
    assert [w.worker.worker_id for w in workers.workers] == ["w0"]
    assert 0 <= workers.workers[0].load.age_s < 2  # the router's load probes answer
    assert len(first.gateways) == 1  # the gateway registered over mTLS too


@pytest.mark.parametrize("who", ["router", "worker"])
def test_client_without_a_mesh_certificate_is_refused(tls_mesh: Mesh, pki: Pki,
                                                      who: str) -> None:
    target = tls_mesh.router if who == "router" else tls_mesh.workers[0]["endpoint"]

    async def attempts() -> dict[str, str]:
        tried = {
            "plaintext": grpc.aio.insecure_channel(target),
            "tls without a client certificate": grpc.aio.secure_channel(
                target, credentials(pki, None, None)),
            "certificate of another CA": grpc.aio.secure_channel(
                target, credentials(pki, pki.rogue_cert, pki.rogue_key)),
            "mesh certificate": mesh_channel(pki, target),
        }
        results = {}
        for name, channel in tried.items():
            async with channel:
                results[name] = await health(channel)
        return results

    assert asyncio.run(attempts()) == {
        "plaintext": "UNAVAILABLE",
        "tls without a client certificate": "UNAVAILABLE",
        "certificate of another CA": "UNAVAILABLE",
        "mesh certificate": "SERVING",
    }


def test_the_public_doors_stay_plaintext(tls_mesh: Mesh) -> None:
    """The gateway's Inference gRPC API is a client door, not an internal hop."""
    async def check() -> str:
        async with grpc.aio.insecure_channel(tls_mesh.grpc) as channel:
            return await health(channel)

    assert asyncio.run(check()) == "SERVING"


def test_worker_without_tls_cannot_join(tls_mesh: Mesh, pki: Pki) -> None:
    """A worker process with the token but no certificate never gets registered."""
    env = {k: v for k, v in os.environ.items() if "SECURITY__TLS" not in k}
    log = tls_mesh.dir / "intruder.log"
    proc = spawn_module("kvmesh.worker", [
        "--no-ray", "--engine-kind", "fake", "--port", "0", "--worker-id", "intruder",
        "--run-dir", str(tls_mesh.dir), "--router", tls_mesh.router], log, env=env)
    tls_mesh.procs["intruder"] = proc
    deadline = time.monotonic() + 60
    while "unreachable" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert "router" in log.read_text()
    assert "intruder" not in [w.worker.worker_id for w in _list_workers(tls_mesh, pki)]


def _list_workers(mesh: Mesh, pki: Pki) -> list[router_pb2.WorkerStatus]:
    async def run() -> list[router_pb2.WorkerStatus]:
        async with mesh_channel(pki, mesh.router) as channel:
            reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=5)
            return list(reply.workers)

    return asyncio.run(run())


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_mutating_rpcs_need_the_internal_token(tls_mesh: Mesh, pki: Pki,
                                               token: str | None) -> None:
    """Even with a valid certificate: RegisterWorker, Heartbeat and DeregisterWorker
    without the right token are UNAUTHENTICATED, with details, and change nothing."""
    metadata = ((TOKEN_METADATA_KEY, token),) if token else ()

    async def calls() -> list[grpc.aio.AioRpcError]:
        errors = []
        async with mesh_channel(pki, tls_mesh.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for call in (
                stub.RegisterWorker(router_pb2.RegisterWorkerRequest(
                    worker=common_pb2.WorkerInfo(worker_id="rogue", endpoint="127.0.0.1:1")),
                    metadata=metadata, timeout=5),
                stub.Heartbeat(router_pb2.HeartbeatRequest(worker_id="w0"),
                               metadata=metadata, timeout=5),
                stub.DeregisterWorker(router_pb2.DeregisterWorkerRequest(worker_id="w0"),
                                      metadata=metadata, timeout=5),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                errors.append(caught.value)
        return errors

    for error in asyncio.run(calls()):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN_METADATA_KEY in (error.details() or "")
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None and status.details  # google.rpc.ErrorInfo, BadRequest
    assert [w.worker.worker_id for w in _list_workers(tls_mesh, pki)] == ["w0"]


def test_health_probe_command_presents_the_mesh_certificate(tls_mesh: Mesh, pki: Pki) -> None:
    """The images' HEALTHCHECK (and Kubernetes exec probes) with mutual TLS on."""
    command = [sys.executable, "-m", "kvmesh.core.health_probe", tls_mesh.router,
               "--timeout", "5"]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (plain.returncode, plain.stdout.strip()) == (1, "UNAVAILABLE")
    with_tls = subprocess.run([*command, "--tls", str(pki.ca), str(pki.cert), str(pki.key)],
                              capture_output=True, text=True, timeout=60)
    assert (with_tls.returncode, with_tls.stdout.strip()) == (0, "SERVING")


@pytest.mark.parametrize("with_tls", [True, False], ids=["edge with tls", "edge without"])
def test_edge_control_plane_follows_the_router_only_over_mtls(tls_mesh: Mesh, pki: Pki,
                                                             with_tls: bool) -> None:
    """`python -m kvmesh.edge --router`: with the mesh's certificate it learns the
    registered gateway from WatchWorkers; without, the router refuses it."""
    env = {k: v for k, v in os.environ.items() if "SECURITY__TLS" not in k}
    if with_tls:
        env |= {f"KVMESH_EDGE_SECURITY__TLS__{k.upper()}": v for k, v in pki.tls().items()}
    name = f"edge-{'tls' if with_tls else 'plain'}"
    log = tls_mesh.dir / f"{name}.log"
    tls_mesh.procs[name] = proc = spawn_module("kvmesh.edge", [
        "--router", tls_mesh.router, "--port", "0", "--listen", "127.0.0.1:1"], log, env=env)
    gateway = tls_mesh.http.removeprefix("http://").removesuffix("/v1")
    expected = f"1 gateway(s) {gateway}" if with_tls else "WatchWorkers on router"
    deadline = time.monotonic() + 60
    while expected not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    if not with_tls:
        assert "UNAVAILABLE" in log.read_text() and gateway not in log.read_text()
