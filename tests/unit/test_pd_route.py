"""Route over P/D pools: the decision in the reply, load accounted on both workers."""

import pytest

from kvmesh.core.config import RouterConfig
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import common_pb2, router_pb2

pytestmark = pytest.mark.unit


class NoDeadline:
    """The part of a grpc.aio context Route reads."""

    def time_remaining(self) -> None:
        return None


def _servicer(mode: str) -> RouterServicer:
    core = RouterCore(RouterConfig(disaggregation=mode, metrics_port=None, seed=0))
    servicer = RouterServicer(core, WorkerLifecycle(core))
    for wid, role in (("p", "prefill"), ("d", "decode")):
        core.registry.upsert(WorkerState(
            worker_id=wid, endpoint=f"127.0.0.1:{ord(wid)}", model="m", role=role,
            block_size=32, kv_connector="nixl", nixl_side_channel=f"127.0.0.1:{ord(wid) + 1}"))
    return servicer


async def test_disaggregated_route_names_both_workers_and_accounts_both() -> None:
    servicer = _servicer("always")
    reply = await servicer.Route(router_pb2.RouteRequest(
        request_id="r1", model="m", token_ids=list(range(1000, 1400)), max_tokens=8),
        NoDeadline())
    assert reply.mode == router_pb2.RouteDecision.MODE_DISAGGREGATED
    assert reply.prefill_worker.worker_id == "p" and reply.worker.worker_id == "d"
    assert reply.prefill_worker.role == common_pb2.WORKER_ROLE_PREFILL
    assert reply.prefill_worker.nixl_side_channel == "127.0.0.1:113"
    assert reply.prefill_worker.kv_connector == "nixl"
    assert reply.reason.startswith("pd:disaggregated:")
    p, d = servicer.core.registry.get("p"), servicer.core.registry.get("d")
    assert p.in_flight == {"r1"} and d.in_flight == {"r1"}
    # The prefill worker is charged the prompt's prefill work, the decode worker none.
    assert p.unreported_prefill_tokens == 400 and d.unreported_prefill_tokens == 0
    for wid in ("p", "d"):
        await servicer.RequestFinished(
            router_pb2.RequestFinishedRequest(request_id="r1", worker_id=wid), None)
    assert not p.in_flight and not d.in_flight


async def test_never_runs_whole_requests_on_the_decode_worker() -> None:
    servicer = _servicer("never")
    reply = await servicer.Route(router_pb2.RouteRequest(
        request_id="r2", model="m", token_ids=list(range(1000, 1400))), NoDeadline())
    assert reply.mode == router_pb2.RouteDecision.MODE_AGGREGATED
    assert reply.worker.worker_id == "d" and not reply.HasField("prefill_worker")
    assert servicer.core.registry.get("d").unreported_prefill_tokens == 400
