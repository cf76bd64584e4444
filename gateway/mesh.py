"""The gateway's view of the mesh: ask the router, stream from the chosen worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.grpc_util import insecure_channel
from kvmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

#: A request that failed before its first token (worker gone) is routed again.
MAX_ATTEMPTS = 3


class MeshClient:
    def __init__(self, router: str, route_timeout_s: float, request_timeout_s: float) -> None:
        self._router_channel = insecure_channel(router)
        self.router = router_pb2_grpc.RouterStub(self._router_channel)
        self._route_timeout_s = route_timeout_s
        self._request_timeout_s = request_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()

    def worker(self, endpoint: str) -> vllm_engine_pb2_grpc.VllmEngineStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = insecure_channel(endpoint)
        return vllm_engine_pb2_grpc.VllmEngineStub(channel)

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        max_tokens: int,
        exclude: Sequence[str] = (),
    ) -> router_pb2.RouteDecision:
        return await self.router.Route(
            router_pb2.RouteRequest(
                request_id=request_id,
                model=model,
                packed_token_ids=np.asarray(token_ids, dtype="<u4").tobytes(),
                max_tokens=max_tokens,
                exclude_worker_ids=exclude,
            ),
            timeout=self._route_timeout_s,
        )

    def _release(self, request_id: str, worker_id: str) -> None:
        """Tell the router the request is done, without making the client wait."""

        async def send() -> None:
            try:
                await self.router.RequestFinished(
                    router_pb2.RequestFinishedRequest(request_id=request_id, worker_id=worker_id),
                    timeout=self._route_timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                log.debug("RequestFinished %s failed: %s", request_id, exc.code().name)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(
        self,
        request_id: str,
        model: str,
        prompt_ids: Sequence[int],
        sampling: vllm_engine_pb2.SamplingParams,
        prompt_text: str = "",
    ) -> AsyncIterator[vllm_engine_pb2.GenerateResponse]:
        """Stream a generation; cancelling the consumer cancels the worker RPC."""
        excluded: list[str] = []
        for attempt in range(MAX_ATTEMPTS):
            decision = await self.route(
                request_id, model, prompt_ids, sampling.max_tokens, excluded
            )
            worker = decision.worker
            log.debug("%s -> %s (%s)", request_id, worker.worker_id, decision.reason)
            call = self.worker(worker.endpoint).Generate(
                vllm_engine_pb2.GenerateRequest(
                    request_id=request_id,
                    tokenized=vllm_engine_pb2.TokenizedInput(
                        input_ids=prompt_ids, original_text=prompt_text
                    ),
                    sampling_params=sampling,
                    stream=True,
                ),
                timeout=self._request_timeout_s,
            )
            started = False
            try:
                async for response in call:
                    started = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                retry = (
                    exc.code() == grpc.StatusCode.UNAVAILABLE
                    and not started
                    and attempt + 1 < MAX_ATTEMPTS
                )
                if not retry:
                    raise
                log.warning("%s: worker %s unavailable, routing again", request_id,
                            worker.worker_id)
                excluded.append(worker.worker_id)
            finally:
                # No-op when the call finished; otherwise the worker aborts the request.
                call.cancel()
                self._release(request_id, worker.worker_id)

    async def close(self) -> None:
        for task in list(self._background):
            await asyncio.wait([task], timeout=1.0)
        for channel in self._channels.values():
            await channel.close()
        await self._router_channel.close()
