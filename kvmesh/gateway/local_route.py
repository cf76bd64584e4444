"""Routing without a router (pure): what a gateway does while no router replica answers.

It keeps serving with the last worker set it was told (``WatchWorkers``) and picks a
worker by the power of two choices over its *own* in-flight counts: two random
candidates, the less busy one wins. Prefix affinity is lost (the prefix index lives in
the router), nothing is refused that a worker can serve. A disaggregated deployment
runs each request whole on a decode worker (which prefills locally).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

from kvmesh.core.errors import ModelNotFoundError, NoWorkerAvailableError
from kvmesh.v1 import common_pb2, router_pb2

#: Roles that can run a whole request.
_WHOLE = (common_pb2.WORKER_ROLE_BOTH, common_pb2.WORKER_ROLE_DECODE,
          common_pb2.WORKER_ROLE_UNSPECIFIED)
REASON = "local_power_of_two:no_router"


class LocalRouter:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.in_flight: Counter[str] = Counter()

    def started(self, worker_id: str) -> None:
        self.in_flight[worker_id] += 1

    def finished(self, worker_id: str) -> None:
        self.in_flight[worker_id] -= 1
        if self.in_flight[worker_id] <= 0:
            del self.in_flight[worker_id]

    def pick(self, workers: Iterable[common_pb2.WorkerInfo], model: str,
             exclude: Iterable[str] = ()) -> router_pb2.RouteDecision:
        """A worker of ``model`` not in ``exclude``, as a router's decision would say."""
        serving = [w for w in workers if w.model == model and w.role in _WHOLE]
        if not serving:
            raise ModelNotFoundError(f"the model `{model}` does not exist", param="model")
        skip = set(exclude)
        candidates = [w for w in serving if w.worker_id not in skip]
        if not candidates:
            raise NoWorkerAvailableError(
                f"no reachable worker serves `{model}` (no router answers; the last known "
                f"{len(serving)} are all excluded or unreachable)")
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            a, b = self._rng.sample(candidates, 2)
            chosen = a if self.in_flight[a.worker_id] <= self.in_flight[b.worker_id] else b
        return router_pb2.RouteDecision(
            mode=router_pb2.RouteDecision.MODE_AGGREGATED, worker=chosen, reason=REASON,
            policy="local")
