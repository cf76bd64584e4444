"""Every service answers standard gRPC health checks and server reflection."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .conftest import Mesh

pytestmark = pytest.mark.integration


async def _check(target: str) -> tuple[int, set[str]]:
    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        services: set[str] = set()
        async for reply in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        ):
            services |= {s.name for s in reply.list_services_response.service}
        return health.status, services


@pytest.mark.parametrize(
    ("which", "service"),
    [("router", "kvmesh.v1.Router"), ("grpc", "kvmesh.v1.Inference"),
     ("worker", "vllm.grpc.engine.VllmEngine")],
)
def test_health_and_reflection(fake_mesh: Mesh, which: str, service: str) -> None:
    target = fake_mesh.workers[0]["endpoint"] if which == "worker" else getattr(fake_mesh, which)
    status, services = asyncio.run(_check(target))
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert {service, "grpc.health.v1.Health"} <= services
