"""vLLM's own VllmEngine servicer (smg-grpc-servicer), with two corrections.

``GetServerInfo`` reports no uptime; the router dates a worker's incarnation by it
(a router restarted from a snapshot restores only the same incarnation's cache view),
so it is added here from the servicer's start time.

The library reads running/waiting counts from the engine's last ``SchedulerStats``.
An engine that goes idle never publishes another one, so after its last request
finishes (or is aborted) it would report that request as running forever — and the
router would steer traffic away from an idle worker. When the engine's output
processor holds no unfinished request, the worker is idle, whatever the last
snapshot said.
"""

from __future__ import annotations

import time

import grpc
from smg_grpc_proto import vllm_engine_pb2
from smg_grpc_servicer.vllm.servicer import VllmEngineServicer


class KvmeshVllmEngineServicer(VllmEngineServicer):
    def _scheduler_counts(self, engine_idx: int = 0) -> tuple[int, int, float] | None:
        counts = super()._scheduler_counts(engine_idx)
        if counts is None:
            return None
        if self.engine.output_processor.get_num_unfinished_requests() == 0:
            return (0, 0, counts[2])
        return counts

    async def GetServerInfo(
        self, request: vllm_engine_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> vllm_engine_pb2.GetServerInfoResponse:
        info = await super().GetServerInfo(request, context)
        if not info.uptime_seconds:
            info.uptime_seconds = time.time() - self.start_time
        return info
