"""The worker registry: who serves what, whether they are alive, how loaded.

Pure bookkeeping (no grpc): the router core feeds it registrations, heartbeats, probe
results and routed/finished requests; policies read :class:`WorkerState` from it.
Gateway replicas live here too (role ``gateway``: leases, heartbeats and expiry as for
workers); no role filter a policy uses selects them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from kvmesh.core.errors import WorkerNotFoundError
from kvmesh.core.roles import GATEWAY
from kvmesh.router.load_table import LoadTable
from kvmesh.router.salts import id_salts


@dataclass
class WorkerLoadView:
    """Load as last reported by the worker, plus the router's own accounting."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    reported_at: float = 0.0
    waiting_uncached_tokens: int = 0
    # Prefix-cache hit rate in [0, 1] as the engine reports it; None until it does.
    cache_hit_rate: float | None = None


@dataclass
class WorkerState:
    worker_id: str
    endpoint: str
    model: str
    role: str = "both"
    #: LoRA adapters loaded on the worker (least recently used first).
    adapters: tuple[str, ...] = ()
    #: Adapters it can serve (loaded, or loaded on demand), and how many it keeps loaded.
    servable_adapters: tuple[str, ...] = ()
    lora_slots: int = 0
    block_size: int = 0
    max_context_length: int = 0
    kv_capacity_tokens: int = 0
    metrics_endpoint: str = ""
    nixl_side_channel: str = ""
    kv_connector: str = ""
    #: A gateway replica's OpenAI HTTP address (role ``gateway`` only; ``endpoint``
    #: is then its Inference gRPC address).
    http_endpoint: str = ""
    dp_rank: int = -1
    #: Routing policy the worker's model asked for ('' : the router's own).
    policy: str = ""
    #: The data-parallel gang this rank belongs to ('' for none) and its rank count.
    dp_group: str = ""
    dp_size: int = 0
    self_registered: bool = True
    #: Finishing what it has, taking nothing new (shutdown, scale-down): no policy
    #: sees it (``candidates``), WatchWorkers shows it.
    draining: bool = False
    last_seen: float = 0.0
    load: WorkerLoadView = field(default_factory=WorkerLoadView)
    in_flight: set[str] = field(default_factory=set)
    # Prompt tokens the router sent since the worker's last load report (not in it yet).
    unreported_prefill_tokens: int = 0
    #: Its last probe failed to connect (or a gateway lost it and the probe that
    #: followed failed): out of the routing set until a probe succeeds again.
    unreachable: bool = False
    #: Its row in the registry's load table (-1: not registered) and that table: set
    #: by the registry, read by ``cost_vector.load_arrays``.
    row: int = field(default=-1, repr=False, compare=False)
    loads: LoadTable | None = field(default=None, repr=False, compare=False)

    @property
    def active(self) -> int:
        """Requests believed to be on the worker: the larger of what we routed and
        what it reports (a plain vLLM worker may also take traffic from elsewhere)."""
        return max(len(self.in_flight), self.load.num_running + self.load.num_waiting)


class Candidates(list[WorkerState]):
    """A candidate selection (``WorkerRegistry.candidates``; read-only by convention),
    with what every decision over it reads worked out once per selection: the ids,
    block sizes and load-table rows in its order."""

    __slots__ = ("ids", "block_sizes", "size_set", "rows", "loads", "salts")
    ids: list[str]
    block_sizes: np.ndarray
    size_set: frozenset[int]  # the distinct block sizes among them
    rows: np.ndarray
    loads: LoadTable | None
    salts: np.ndarray  # the rendezvous salts in its order

    def __init__(self, workers: Iterable[WorkerState] = (),
                 like: Candidates | None = None, loads: LoadTable | None = None) -> None:
        super().__init__(workers)
        if like is not None:  # a copy of a selection: the same numbers
            self.ids, self.block_sizes, self.size_set = like.ids, like.block_sizes, \
                like.size_set
            self.rows, self.loads, self.salts = like.rows, like.loads, like.salts
            return
        self.ids = [w.worker_id for w in self]
        self.block_sizes = np.array([w.block_size for w in self], dtype=np.int64)
        self.size_set = frozenset(w.block_size for w in self)
        self.rows = np.array([w.row for w in self], dtype=np.intp)
        self.loads = loads
        self.salts = id_salts(self.ids)


class WorkerRegistry:
    """Registered workers, keyed by id; changes bump :attr:`version`."""

    def __init__(self, lease_ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._workers: dict[str, WorkerState] = {}
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self.version = 0
        self._selected: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]],
                             Candidates] = {}
        self._selected_version = -1
        self._models: list[str] = []
        self._models_version = -1
        self._roles: frozenset[str] = frozenset()
        self._roles_version = -1
        #: Every registered worker's load numbers as columns (kept exact here).
        self.loads = LoadTable()

    def __len__(self) -> int:
        return len(self._workers)

    def upsert(self, worker: WorkerState) -> WorkerState:
        """Add or replace a worker; keeps in-flight accounting across re-registration."""
        old = self._workers.get(worker.worker_id)
        if old is not None and old is not worker:
            worker.in_flight = old.in_flight
            worker.load = old.load
            worker.row = old.row  # the replacement takes its row over
            old.row, old.loads = -1, None
        worker.last_seen = self._clock()
        self._workers[worker.worker_id] = worker
        self.loads.add(worker)
        self.version += 1
        return worker

    def remove(self, worker_id: str) -> bool:
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return False
        self.loads.remove(worker)
        self.version += 1
        return True

    def drain(self, worker_id: str) -> WorkerState | None:
        """Take a worker out of the routing set, keeping it registered; None when
        unknown."""
        worker = self._workers.get(worker_id)
        if worker is not None and not worker.draining:
            worker.draining = True
            self.version += 1
        return worker

    def get(self, worker_id: str) -> WorkerState:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise WorkerNotFoundError(f"unknown worker {worker_id!r}") from None

    def touch(self, worker_id: str) -> bool:
        """Record a sign of life; False when the worker is unknown."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        worker.last_seen = self._clock()
        return True

    def set_reachable(self, worker_id: str, reachable: bool) -> bool:
        """Take a worker out of (or back into) the routing set; True when that changed
        the set (watchers are then told)."""
        worker = self._workers.get(worker_id)
        if worker is None or worker.unreachable == (not reachable):
            return False
        worker.unreachable = not reachable
        self.version += 1
        return True

    def report_load(
        self, worker_id: str, num_running: int, num_waiting: int, kv_usage: float,
        waiting_uncached_tokens: int = 0, cache_hit_rate: float | None = None,
    ) -> None:
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        now = self._clock()
        if cache_hit_rate is None:  # not in every report: keep the last one
            cache_hit_rate = worker.load.cache_hit_rate
        worker.load = WorkerLoadView(
            num_running, num_waiting, kv_usage, now, waiting_uncached_tokens, cache_hit_rate)
        worker.unreported_prefill_tokens = 0
        worker.last_seen = now
        self.loads.write(worker)

    def lapsed(self) -> list[str]:
        """Workers not seen within the lease (still registered)."""
        cutoff = self._clock() - self._lease_ttl_s
        return [wid for wid, w in self._workers.items() if w.last_seen < cutoff]
    def report_adapters(self, worker_id: str, loaded: Iterable[str],
                        servable: Iterable[str]) -> bool:
        """The worker's adapters as it reports them; True when the set it can serve
        changed (the gateways' model lists follow: the version moves)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        worker.adapters = tuple(loaded)
        servable_now = tuple(sorted(servable))
        if servable_now == worker.servable_adapters:
            return False
        worker.servable_adapters = servable_now
        self.version += 1
        return True

    def adapter_routed(self, worker_id: str, adapter: str) -> None:
        """A request for ``adapter`` went to the worker: it loads it (evicting its least
        recently used one when full) before its next report says so."""
        worker = self._workers.get(worker_id)
        if worker is None or not adapter:
            return
        held = [a for a in worker.adapters if a != adapter] + [adapter]
        worker.adapters = tuple(held[-worker.lora_slots:] if worker.lora_slots else held)

    def expire(self) -> list[str]:
        """Remove workers not seen within the lease; return their ids."""
        dead = self.lapsed()
        for wid in dead:
            self.remove(wid)
        return dead

    def routed(self, worker_id: str, request_id: str, uncached_tokens: int = 0) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.in_flight.add(request_id)
            worker.unreported_prefill_tokens += uncached_tokens
            self.loads.write_routed(worker)

    def finished(self, worker_id: str, request_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.in_flight.discard(request_id)
            self.loads.write_routed(worker)

    def all(self) -> list[WorkerState]:
        return list(self._workers.values())

    def state_of(self, worker: WorkerState, fresh_s: float) -> str:
        """``ready`` when seen within ``fresh_s``, else ``stale`` (lease not yet expired)."""
        return "ready" if self._clock() - worker.last_seen <= fresh_s else "stale"

    def candidates(
        self, model: str, adapter: str = "", exclude: Iterable[str] = (),
        roles: Iterable[str] = ("both", "decode"),
    ) -> Candidates:
        """Workers of ``roles`` serving ``model`` (and able to serve ``adapter``: it is
        loaded there or loadable on demand), in id order.

        The default roles are the ones that can run a whole request (a decode worker
        prefills locally when it gets no KV). The selection is kept until the worker
        set changes (every decision asks; at hundreds of workers filtering and
        sorting would cost more than the decision), with its ids, block sizes and
        load-table rows (``Candidates``): the same object every time until then, so
        callers must not change it (copy it first: ``Candidates(c, like=c)``)."""
        key = (model, adapter, tuple(exclude), tuple(roles))
        if self._selected_version != self.version:
            self._selected.clear()
            self._selected_version = self.version
        selected = self._selected.get(key)
        if selected is None:
            if len(self._selected) > 1024:  # many distinct exclude lists: start over
                self._selected.clear()
            selected = self._selected[key] = Candidates(
                self._select(model, adapter, key[2], key[3]), loads=self.loads)
        return selected

    def _select(self, model: str, adapter: str, exclude: Iterable[str],
                roles: Iterable[str]) -> list[WorkerState]:
        excluded = set(exclude)
        wanted = set(roles)
        whole = self.whole_gangs()
        return sorted(
            (
                w
                for w in self._workers.values()
                if w.model == model
                and w.role in wanted
                and (not adapter or adapter in w.adapters or adapter in w.servable_adapters)
                and w.worker_id not in excluded
                and not w.draining
                and not w.unreachable
                and (not w.dp_group or w.dp_group in whole)
            ),
            key=lambda w: w.worker_id,
        )

    def whole_gangs(self) -> set[str]:
        """Data-parallel groups with every rank registered: a gang serves whole or not
        at all (its ranks meet in collectives every step)."""
        ranks: dict[str, set[int]] = {}
        sizes: dict[str, int] = {}
        for w in self._workers.values():
            if w.dp_group:
                ranks.setdefault(w.dp_group, set()).add(w.dp_rank)
                sizes[w.dp_group] = w.dp_size
        return {g for g, seen in ranks.items() if len(seen) >= sizes[g]}

    def gang_mates(self, worker_id: str) -> list[str]:
        """The other ranks of ``worker_id``'s data-parallel group (none without one)."""
        worker = self._workers.get(worker_id)
        if worker is None or not worker.dp_group:
            return []
        return sorted(w.worker_id for w in self._workers.values()
                      if w.dp_group == worker.dp_group and w.worker_id != worker_id)

    def roles(self) -> frozenset[str]:
        """The roles registered (asked on every route: kept until the worker set
        changes)."""
        if self._roles_version != self.version:
            self._roles = frozenset(w.role for w in self._workers.values())
            self._roles_version = self.version
        return self._roles

    def models(self) -> list[str]:
        """The models served (asked on every route: kept until the worker set changes)."""
        if self._models_version != self.version:
            self._models = sorted({w.model for w in self._workers.values()
                                   if w.role != GATEWAY})
            self._models_version = self.version
        return self._models
