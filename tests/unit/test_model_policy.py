"""Each model is routed by its own policy: the one its workers registered with (a
model's ``policy`` in ModelConfig), else the router's."""

import pytest

from kvmesh.core.config import RouterConfig
from kvmesh.core.errors import InvalidRequestError
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import common_pb2, router_pb2

pytestmark = pytest.mark.unit


class NoDeadline:
    def time_remaining(self) -> None:
        return None


def _servicer() -> RouterServicer:
    core = RouterCore(RouterConfig(policy="kv_aware", metrics_port=None, seed=0))
    for wid, model, policy in (("a0", "a", ""), ("a1", "a", ""),
                               ("b0", "b", "round_robin"), ("b1", "b", "round_robin")):
        core.registry.upsert(WorkerState(worker_id=wid, endpoint=f"127.0.0.1:{len(wid)}",
                                         model=model, block_size=32, policy=policy))
    return RouterServicer(core, WorkerLifecycle(core))


async def _route(servicer: RouterServicer, model: str, rid: str) -> router_pb2.RouteDecision:
    reply = await servicer.Route(router_pb2.RouteRequest(
        request_id=rid, model=model, token_ids=list(range(64))), NoDeadline())
    await servicer.RequestFinished(router_pb2.RequestFinishedRequest(
        request_id=rid, worker_id=reply.worker.worker_id), None)
    return reply


async def test_each_model_is_routed_by_its_registered_policy() -> None:
    servicer = _servicer()
    b = [await _route(servicer, "b", f"b{i}") for i in range(4)]
    assert {r.policy for r in b} == {"round_robin"}
    # Round robin alternates even for the same prompt, which kv_aware would keep together.
    assert [r.worker.worker_id for r in b] in (["b0", "b1"] * 2, ["b1", "b0"] * 2)
    a = [await _route(servicer, "a", f"a{i}") for i in range(2)]
    assert {r.policy for r in a} == {"kv_aware"}
    assert servicer.core.policy_for("a") is servicer.core.policy
    listed = await servicer.ListWorkers(router_pb2.ListWorkersRequest(model="b"), None)
    assert {s.worker.routing_policy for s in listed.workers} == {"round_robin"}


async def test_the_policy_follows_the_model_s_workers() -> None:
    servicer = _servicer()
    core = servicer.core
    assert core.policy_for("b").name == "round_robin"
    for wid in ("b0", "b1"):
        core.remove_worker(wid)
    core.registry.upsert(WorkerState(worker_id="b2", endpoint="127.0.0.1:9", model="b",
                                     block_size=32, policy="random"))
    assert core.policy_for("b").name == "random"


async def test_an_unknown_policy_is_refused_at_registration() -> None:
    servicer = _servicer()
    with pytest.raises(InvalidRequestError, match="unknown routing policy 'fastest'") as exc:
        await servicer.lifecycle.register(common_pb2.WorkerInfo(
            worker_id="x", endpoint="127.0.0.1:1", model="c", routing_policy="fastest"))
    assert exc.value.param == "worker.routing_policy"
