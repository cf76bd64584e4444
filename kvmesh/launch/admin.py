"""The running mesh's admin service (``kvmesh.v1.MeshAdmin``) and its client.

The process that started the mesh (`kvmesh up`, `kvmesh deploy ray`, a program holding
``kvmesh.build_app(...)``) owns the Ray actors, so it alone can add or remove a model's
pool: it serves this service on 127.0.0.1 (``MeshConfig.admin_port``) and records the
address in its state file, where `kvmesh models add/remove/list` find it.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from pydantic import ValidationError

from kvmesh.core.errors import InvalidRequestError
from kvmesh.core.grpc_util import bind, create_server, internal_channel
from kvmesh.core.model_config import ModelConfig
from kvmesh.core.roles import WorkerRole, role_to_proto
from kvmesh.core.validation import describe, key_of
from kvmesh.launch.pool_runner import RunningPool
from kvmesh.v1 import common_pb2, mesh_admin_pb2, mesh_admin_pb2_grpc

#: Deadline of an AddModel call: a first vLLM start compiles for about a minute.
ADD_TIMEOUT_S = 900.0


class ManagedPools(Protocol):
    """What the admin service needs of the application (``MeshApp``)."""

    async def add_model(self, model: ModelConfig) -> RunningPool: ...

    async def remove_model(self, model_id: str) -> RunningPool: ...

    def models(self) -> list[RunningPool]: ...


def parse_model(data: str | dict[str, Any]) -> ModelConfig:
    """A ModelConfig from JSON text or a mapping; a bad one is an InvalidRequestError
    whose message lists every faulty key (and ``param`` names the first)."""
    try:
        if isinstance(data, str):
            return ModelConfig.model_validate_json(data)
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise InvalidRequestError(describe(exc, "model config"), param=key_of(first)) from None


def pool_to_proto(pool: RunningPool) -> mesh_admin_pb2.MeshModel:
    return mesh_admin_pb2.MeshModel(
        model_id=pool.model_id,
        model_config_json=pool.model.model_dump_json(exclude_unset=True),
        workers=[common_pb2.WorkerInfo(
            worker_id=w["worker_id"], endpoint=w["endpoint"], model=w["model"],
            role=role_to_proto(WorkerRole(w["role"])),
            metrics_endpoint=w.get("metrics", "")) for w in pool.workers])


class MeshAdminServicer(mesh_admin_pb2_grpc.MeshAdminServicer):
    def __init__(self, pools: ManagedPools) -> None:
        self._pools = pools

    async def AddModel(
        self, request: mesh_admin_pb2.AddModelRequest, context: grpc.aio.ServicerContext
    ) -> mesh_admin_pb2.AddModelResponse:
        pool = await self._pools.add_model(parse_model(request.model_config_json))
        return mesh_admin_pb2.AddModelResponse(model=pool_to_proto(pool))

    async def RemoveModel(
        self, request: mesh_admin_pb2.RemoveModelRequest, context: grpc.aio.ServicerContext
    ) -> mesh_admin_pb2.RemoveModelResponse:
        pool = await self._pools.remove_model(request.model_id)
        return mesh_admin_pb2.RemoveModelResponse(model=pool_to_proto(pool))

    async def ListModels(
        self, request: mesh_admin_pb2.ListMeshModelsRequest, context: grpc.aio.ServicerContext
    ) -> mesh_admin_pb2.ListMeshModelsResponse:
        return mesh_admin_pb2.ListMeshModelsResponse(
            models=[pool_to_proto(p) for p in self._pools.models()])


async def start_admin_server(pools: ManagedPools, host: str, port: int
                             ) -> tuple[grpc.aio.Server, str]:
    """Serve MeshAdmin (with the error interceptor: kvmesh errors become their status)."""
    server = create_server()
    mesh_admin_pb2_grpc.add_MeshAdminServicer_to_server(MeshAdminServicer(pools), server)
    # The launching host's own door, as the CLI that dials it (no mesh certificate).
    bound = bind(server, host, port, public=True)
    await server.start()
    return server, f"{host}:{bound}"


class AdminClient:
    """The MeshAdmin calls `kvmesh models ...` makes, one channel per use."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def add(self, model: ModelConfig, timeout_s: float = ADD_TIMEOUT_S
                  ) -> mesh_admin_pb2.MeshModel:
        async with internal_channel(self.address) as channel:
            reply = await mesh_admin_pb2_grpc.MeshAdminStub(channel).AddModel(
                mesh_admin_pb2.AddModelRequest(
                    model_config_json=model.model_dump_json(exclude_unset=True)),
                timeout=timeout_s)
        return reply.model

    async def remove(self, model_id: str, timeout_s: float = 120.0
                     ) -> mesh_admin_pb2.MeshModel:
        async with internal_channel(self.address) as channel:
            reply = await mesh_admin_pb2_grpc.MeshAdminStub(channel).RemoveModel(
                mesh_admin_pb2.RemoveModelRequest(model_id=model_id), timeout=timeout_s)
        return reply.model

    async def list(self, timeout_s: float = 10.0) -> list[mesh_admin_pb2.MeshModel]:
        async with internal_channel(self.address) as channel:
            reply = await mesh_admin_pb2_grpc.MeshAdminStub(channel).ListModels(
                mesh_admin_pb2.ListMeshModelsRequest(), timeout=timeout_s)
        return list(reply.models)
