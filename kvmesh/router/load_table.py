"""The registry's load table: every worker's load numbers as numpy columns.

A decision over hundreds of candidates needs each one's load (what it reported, what
this router routed there since). Reading those from hundreds of ``WorkerState``
objects costs a Python attribute walk per worker per column on every decision; the
table keeps them in columns instead, written when they change (a load report, a
routed or finished request, a registration), so a decision gathers its candidates'
rows with one fancy index per column (``cost_vector.load_arrays``).

The registry owns the table and keeps it exact: each registered ``WorkerState``
holds its row (``row``, -1 once removed or replaced) and the table it is in.
``tests/unit/test_load_table.py`` checks every change reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from operator import attrgetter
from typing import Any, Protocol

import numpy as np


class _Load(Protocol):
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def waiting_uncached_tokens(self) -> int: ...
    @property
    def kv_usage(self) -> float: ...


class WorkerState(Protocol):
    """What the table reads of ``registry.WorkerState`` (and the two fields it sets)."""

    row: int
    loads: LoadTable | None

    @property
    def load(self) -> _Load: ...
    @property
    def in_flight(self) -> Set[str]: ...
    @property
    def unreported_prefill_tokens(self) -> int: ...

F64 = np.ndarray[Any, np.dtype[np.float64]]

_ROW = attrgetter("row")
_LOADS = attrgetter("loads")

#: The columns, by the WorkerState number each mirrors.
COLUMNS = ("running", "waiting", "uncached", "kv_usage", "routed", "unreported")


class LoadTable:
    """Rows of load numbers, one per registered worker; rows of removed workers are
    reused."""

    def __init__(self, capacity: int = 64) -> None:
        #: num_running, num_waiting, waiting_uncached_tokens, kv_usage as last reported.
        self.running = np.zeros(capacity)
        self.waiting = np.zeros(capacity)
        self.uncached = np.zeros(capacity)
        self.kv_usage = np.zeros(capacity)
        #: Requests this router routed there and has not seen finish (len(in_flight)).
        self.routed = np.zeros(capacity)
        #: Prompt tokens routed there since its last report.
        self.unreported = np.zeros(capacity)
        self._free: list[int] = []
        self._used = 0

    def __len__(self) -> int:
        """Rows in use."""
        return self._used - len(self._free)

    def add(self, worker: WorkerState) -> None:
        """Give ``worker`` a row (its old one when it replaces a registered worker
        object with the same id: pass that as ``worker.row`` already set) and write
        its numbers."""
        if worker.loads is not None and worker.loads is not self:
            worker.row = -1  # a row of another registry's table
        if worker.row < 0:
            if self._free:
                worker.row = self._free.pop()
            else:
                if self._used == len(self.running):
                    self._grow()
                worker.row = self._used
                self._used += 1
        worker.loads = self
        self.write(worker)

    def remove(self, worker: WorkerState) -> None:
        """``worker`` left: its row is free for the next one."""
        if worker.loads is self and worker.row >= 0:
            self._free.append(worker.row)
            for name in COLUMNS:
                getattr(self, name)[worker.row] = 0.0
        worker.row, worker.loads = -1, None

    def write(self, worker: WorkerState) -> None:
        """Copy all of ``worker``'s numbers into its row."""
        row, load = worker.row, worker.load
        self.running[row] = load.num_running
        self.waiting[row] = load.num_waiting
        self.uncached[row] = load.waiting_uncached_tokens
        self.kv_usage[row] = load.kv_usage
        self.routed[row] = len(worker.in_flight)
        self.unreported[row] = worker.unreported_prefill_tokens

    def write_routed(self, worker: WorkerState) -> None:
        """The router's own accounting of ``worker`` changed (routed, finished)."""
        self.routed[worker.row] = len(worker.in_flight)
        self.unreported[worker.row] = worker.unreported_prefill_tokens

    def rows(self, workers: Sequence[WorkerState]) -> np.ndarray[Any, np.dtype[np.intp]] | None:
        """The workers' rows (C-level passes), or None unless every one of them is
        registered in this table."""
        n = len(workers)
        rows = np.fromiter(map(_ROW, workers), np.intp, n)
        if not n or rows.min() < 0 or set(map(_LOADS, workers)) != {self}:
            return None
        return rows

    def _grow(self) -> None:
        for name in COLUMNS:
            old = getattr(self, name)
            grown = np.zeros(2 * len(old))
            grown[:len(old)] = old
            setattr(self, name, grown)
