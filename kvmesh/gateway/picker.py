"""The edge's endpoint picker: kvmesh's routing decision as an Envoy external processor.

It follows the Gateway API Inference Extension's endpoint-picker protocol over
``envoy.service.ext_proc.v3``: Envoy sends a request's headers, then its whole body
(buffered); the picker reads the model and the prompt from the body, asks the router
where the request would go (a ``preview`` Route: kv_aware's decision, nothing booked)
and answers with the chosen endpoint in the ``x-gateway-destination-endpoint`` header
and in the ``envoy.lb`` dynamic metadata, so Envoy's original-destination cluster sends
the request straight there.

kvmesh workers speak gRPC (the ``VllmEngine`` contract), not OpenAI HTTP, so the
endpoint picked is the gateway that fronts the chosen worker: one on the worker's host
when there is one (a gateway beside each worker, as in a pod), else one of the
registered gateways chosen by rendezvous hashing on the worker's id, so one worker's
requests keep going through one gateway while the gateway set holds. The picker also
sets ``x-kvmesh-worker``; that gateway routes with it as its preferred worker, so the
router books the request on the worker the picker chose (unless it left meanwhile).

The picker runs inside every gateway (``GatewayConfig.endpoint_picker``) on its gRPC
port: it tokenizes exactly as the gateway will (chat template included), so the router
sees the same token ids twice. A body it cannot read (bad JSON, unknown model) is sent
on unchanged to some gateway, whose answer is the usual OpenAI error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import struct_pb2
from pydantic import ValidationError

from kvmesh.core.errors import KvmeshError
from kvmesh.gateway.core import GatewayCore, new_request_id
from kvmesh.gateway.lifecycle import Prepared, prepare_chat, prepare_completion
from kvmesh.gateway.router_client import PREFERRED_WORKER_HEADER
from kvmesh.gateway.schemas import ChatCompletionRequest, CompletionRequest
from kvmesh.v1 import common_pb2

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
WORKER_HEADER = PREFERRED_WORKER_HEADER
LB_NAMESPACE = "envoy.lb"
SERVICE_NAME = ext_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
#: The paths whose requests are picked for (generations; everything else is not).
PICKED_PATHS = ("/v1/chat/completions", "/v1/completions")


def _host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


def destination(worker: common_pb2.WorkerInfo,
                gateways: Sequence[common_pb2.WorkerInfo]) -> str:
    """The HTTP endpoint of the gateway that fronts ``worker`` (pure): among the
    gateways on the worker's host if any, else among all, the rendezvous-hash winner
    for the worker's id; "" when no gateway is registered."""
    usable = [g for g in gateways if g.http_endpoint]
    near = [g for g in usable if _host(g.http_endpoint) == _host(worker.endpoint)]

    def weight(g: common_pb2.WorkerInfo) -> bytes:
        return hashlib.blake2b(f"{worker.worker_id}|{g.http_endpoint}".encode(),
                               digest_size=8).digest()

    pool = near or usable
    return max(pool, key=weight).http_endpoint if pool else ""


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def body_response(endpoint: str, worker_id: str) -> ext_pb2.ProcessingResponse:
    """The answer to a request body: where Envoy sends it (header and metadata)."""
    headers = [_header(DESTINATION_HEADER, endpoint)]
    if worker_id:
        headers.append(_header(WORKER_HEADER, worker_id))
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: endpoint}})
    return ext_pb2.ProcessingResponse(
        request_body=ext_pb2.BodyResponse(response=ext_pb2.CommonResponse(
            header_mutation=ext_pb2.HeaderMutation(set_headers=headers))),
        dynamic_metadata=metadata)


def _headers(msg: ext_pb2.HttpHeaders) -> dict[str, str]:
    return {h.key.lower(): h.raw_value.decode("utf-8", "replace") or h.value
            for h in msg.headers.headers}


class EndpointPicker(ext_grpc.ExternalProcessorServicer):
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def Process(
        self, request_iterator: AsyncIterator[ext_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext_pb2.ProcessingResponse]:
        headers: dict[str, str] = {}
        async for msg in request_iterator:
            kind = msg.WhichOneof("request")
            if kind == "request_headers":
                headers = _headers(msg.request_headers)
                yield ext_pb2.ProcessingResponse(request_headers=ext_pb2.HeadersResponse())
            elif kind == "request_body":
                yield await self.pick(headers, msg.request_body.body)
            elif kind == "request_trailers":
                yield ext_pb2.ProcessingResponse(request_trailers=ext_pb2.TrailersResponse())
            elif kind == "response_headers":
                yield ext_pb2.ProcessingResponse(response_headers=ext_pb2.HeadersResponse())
            elif kind == "response_body":
                yield ext_pb2.ProcessingResponse(response_body=ext_pb2.BodyResponse())
            elif kind == "response_trailers":
                yield ext_pb2.ProcessingResponse(response_trailers=ext_pb2.TrailersResponse())

    async def pick(self, headers: dict[str, str], body: bytes) -> ext_pb2.ProcessingResponse:
        request_id = headers.get("x-request-id") or new_request_id("pick")
        worker: common_pb2.WorkerInfo | None = None
        try:
            prepared = await self._prepare(headers.get(":path", ""), body)
            if prepared is not None:
                spec = prepared.specs[0]
                routed = await self.core.mesh.route(
                    request_id, spec.model, spec.prompt_ids, spec.max_tokens,
                    adapter=spec.adapter, preview=True)
                worker = routed.decision.worker
        except (ValueError, ValidationError, KvmeshError, grpc.aio.AioRpcError) as exc:
            # The gateway it lands on gives the client the proper error.
            log.debug("no pick for %s: %s", request_id, exc)
        gateways = self.core.catalog.gateways
        if worker is not None:
            endpoint = destination(worker, gateways)
        else:  # any gateway will do; spread by request id
            endpoint = destination(common_pb2.WorkerInfo(worker_id=request_id), gateways)
        endpoint = endpoint or self.core.http_address
        log.debug("picked %s (worker %s) for %s", endpoint,
                  worker.worker_id if worker else "-", request_id)
        return body_response(endpoint, worker.worker_id if worker else "")

    async def _prepare(self, path: str, body: bytes) -> Prepared | None:
        path = path.split("?", 1)[0]
        if path not in PICKED_PATHS:
            return None
        data = json.loads(body)
        if path == "/v1/chat/completions":
            return await prepare_chat(self.core, ChatCompletionRequest.model_validate(data))
        return await prepare_completion(self.core, CompletionRequest.model_validate(data))


def add_endpoint_picker(server: grpc.aio.Server, core: GatewayCore) -> None:
    ext_grpc.add_ExternalProcessorServicer_to_server(EndpointPicker(core), server)
