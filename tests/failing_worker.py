"""A worker that answers the router (model info, loads) but fails every generation
with INTERNAL, counting the calls in a file: ``python -m tests.failing_worker MODEL_DIR
READY_FILE CALLS_FILE`` (a process of its own: tests fork gateways, and a grpc server
running in the test process would not survive that)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.core.grpc_util import bind, create_server
from kvmesh.core.service_main import write_ready_file
from kvmesh.worker.fake_engine import FakeVllmEngineServicer

MODEL = "SmolLM2-135M-Instruct"


class FailingEngine(FakeVllmEngineServicer):
    def __init__(self, model_dir: Path, calls: Path) -> None:
        super().__init__(MODEL, model_dir)
        self._calls = calls

    async def Generate(  # type: ignore[override]
        self, request: vllm_engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vllm_engine_pb2.GenerateResponse]:
        with self._calls.open("a") as f:
            f.write(request.request_id + "\n")
        await context.abort(grpc.StatusCode.INTERNAL, "engine core died")
        yield vllm_engine_pb2.GenerateResponse()


async def main(model_dir: Path, ready: Path, calls: Path) -> None:
    server = create_server()
    vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(FailingEngine(model_dir, calls),
                                                          server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    write_ready_file(ready, {"endpoint": f"127.0.0.1:{port}"})
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
