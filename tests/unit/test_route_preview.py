"""Route's preview and preferred worker (the edge's endpoint picker): a preview decides
as kv_aware would and books nothing; a Route preferring that worker books it there,
unless it is no longer a candidate."""

import pytest

from kvmesh.core.config import RouterConfig
from kvmesh.router.core import RouterCore
from kvmesh.router.lifecycle import WorkerLifecycle
from kvmesh.router.registry import WorkerState
from kvmesh.router.servicer import RouterServicer
from kvmesh.v1 import router_pb2

pytestmark = pytest.mark.unit
PROMPT = list(range(1000, 1400))


class NoDeadline:
    def time_remaining(self) -> None:
        return None


def servicer() -> RouterServicer:
    core = RouterCore(RouterConfig(policy="kv_aware", metrics_port=None, seed=0))
    for wid in ("a", "b", "c"):
        core.registry.upsert(WorkerState(worker_id=wid, endpoint=f"127.0.0.1:{ord(wid)}",
                                         model="m", role="both", block_size=32))
    return RouterServicer(core, WorkerLifecycle(core))


async def route(s: RouterServicer, rid: str, **fields: object) -> router_pb2.RouteDecision:
    return await s.Route(router_pb2.RouteRequest(
        request_id=rid, model="m", token_ids=PROMPT, max_tokens=8, **fields), NoDeadline())


async def test_a_preview_books_nothing_and_matches_the_real_decision() -> None:
    s = servicer()
    first = await route(s, "p1", preview=True)
    again = await route(s, "p2", preview=True)
    assert first.worker.worker_id == again.worker.worker_id  # nothing booked in between
    assert all(not w.in_flight and not w.unreported_prefill_tokens
               for w in s.core.registry.all())
    booked = await route(s, "r1")
    assert booked.worker.worker_id == first.worker.worker_id
    assert s.core.registry.get(booked.worker.worker_id).in_flight == {"r1"}
    # Now the prefix is pending there: previews follow it (prefix affinity).
    assert (await route(s, "p3", preview=True)).worker.worker_id == booked.worker.worker_id


async def test_the_preferred_worker_is_booked_while_it_is_a_candidate() -> None:
    s = servicer()
    natural = (await route(s, "p", preview=True)).worker.worker_id
    other = next(w for w in ("a", "b", "c") if w != natural)
    reply = await route(s, "r1", prefer_worker_id=other)
    assert reply.worker.worker_id == other
    assert s.core.registry.get(other).in_flight == {"r1"}
    # Excluded (a retry after it failed) or gone: decided as usual.
    retry = await route(s, "r2", prefer_worker_id=other, exclude_worker_ids=[other])
    assert retry.worker.worker_id != other
    s.core.remove_worker(other)
    assert (await route(s, "r3", prefer_worker_id=other)).worker.worker_id != other
