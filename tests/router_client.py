"""What tests ask a running router, over its real gRPC API."""

from __future__ import annotations

import asyncio

import grpc

from kvmesh.v1 import router_pb2, router_pb2_grpc


def list_workers(router: str) -> list[router_pb2.WorkerStatus]:
    """The router's ListWorkers answer: every registered worker with its load."""
    async def run() -> list[router_pb2.WorkerStatus]:
        async with grpc.aio.insecure_channel(router) as channel:
            reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=5)
            return list(reply.workers)

    return asyncio.run(run())
