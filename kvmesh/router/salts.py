"""Each worker's 64-bit rendezvous salt (pure): the blake2b of its id, worked out once
per id. The registry's candidate selections keep their salts as an array
(``Candidates.salts``); ``cost_vector.rendezvous_pick`` mixes them with a key."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np


class _Salts(dict[str, int]):
    """worker id -> its salt, computed on first use (at most 65,536 kept)."""

    def __missing__(self, worker_id: str) -> int:
        salt = int.from_bytes(hashlib.blake2b(worker_id.encode(), digest_size=8).digest(),
                              "little")
        if len(self) < 65536:
            self[worker_id] = salt
        return salt


worker_salt = _Salts().__getitem__


def id_salts(worker_ids: Sequence[str]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """The salts of ``worker_ids`` in their order (C-level lookups)."""
    return np.fromiter(map(worker_salt, worker_ids), np.uint64, len(worker_ids))
