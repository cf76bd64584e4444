"""vLLM's own VllmEngine servicer (smg-grpc-servicer), with one correction.

The library reads running/waiting counts from the engine's last ``SchedulerStats``.
An engine that goes idle never publishes another one, so after its last request
finishes (or is aborted) it would report that request as running forever — and the
router would steer traffic away from an idle worker. When the engine's output
processor holds no unfinished request, the worker is idle, whatever the last
snapshot said.
"""

from __future__ import annotations

from smg_grpc_servicer.vllm.servicer import VllmEngineServicer


class KvmeshVllmEngineServicer(VllmEngineServicer):
    def _scheduler_counts(self, engine_idx: int = 0) -> tuple[int, int, float] | None:
        counts = super()._scheduler_counts(engine_idx)
        if counts is None:
            return None
        if self.engine.output_processor.get_num_unfinished_requests() == 0:
            return (0, 0, counts[2])
        return counts
