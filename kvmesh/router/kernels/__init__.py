"""Compiled kernels of the router's hot paths (numba; pure: no grpc, no vllm).

Everything works on flat numpy arrays, so the index costs a few bytes per block and no
Python objects (nothing for the garbage collector to walk): ``tables`` has the block
hash chain, the holder and engine tables and prompt matching; ``pending`` the table of
routed-but-unconfirmed blocks; ``costs`` the cost model over a decision's candidates.
Each kernel compiles once and is cached on disk; ``warm_up`` loads them all before the
first request.
"""

from __future__ import annotations

import numpy as np

from kvmesh.router.kernels import costs, pending, tables


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel with the types the index
    uses, so the first routed request pays nothing."""
    tokens = np.arange(64, dtype=np.uint32)
    hashes, sums = tables.chain(tokens, 16, np.uint64(1), np.uint64(0), 0)
    keys, masks = np.zeros(16, np.uint64), np.zeros((16, 1), np.uint64)
    seen = np.zeros(len(hashes), np.bool_)
    tables.holder_set(keys, masks, hashes, 0, np.uint64(1), seen)
    tables.match(keys, masks, hashes, np.ones(1, np.uint64), np.zeros(64, np.int32))
    tables.holder_clear(keys, masks, hashes, 0, np.uint64(1))
    ekeys, esums, elens = np.zeros(16, np.uint64), np.zeros(16, np.uint64), np.zeros(16, np.uint32)
    fresh = np.zeros(len(hashes), np.bool_)
    tables.engine_put(ekeys, esums, elens, hashes, sums, 1, fresh)
    tables.engine_get(ekeys, esums, elens, hashes[0])
    tables.engine_items(ekeys, esums, elens)
    tables.engine_put_states(ekeys, esums, elens, hashes, sums, np.ones(len(hashes), np.uint32))
    tables.rehash_engine(ekeys, esums, elens, ekeys.copy(), esums.copy(), elens.copy())
    tables.rehash_holders(keys, masks, keys.copy(), masks.copy())
    tables.engine_pop(ekeys, esums, elens, hashes, np.zeros(len(hashes), np.uint64))
    pkeys, pmasks, pexp = np.zeros(16, np.uint64), np.zeros((16, 1), np.uint64), np.zeros(16)
    positions = np.arange(len(hashes), dtype=np.int64)
    pending.pending_mark(pkeys, pmasks, pexp, keys, masks, hashes, positions, 0,
                         np.uint64(2), 0.0, 1.0)
    pending.pending_match(pkeys, pmasks, pexp, 0.0, hashes, positions, 16,
                          np.ones(1, np.uint64), np.zeros(64, np.int32))
    pending.pending_clear(pkeys, pmasks, hashes, 0, np.uint64(2))
    live = np.ones(1, np.uint64)
    pending.match_counts(keys, masks, pkeys, pmasks, pexp, 0.0, True, hashes, positions, 16,
                         live, np.zeros(2, np.int64), np.ones(2, np.bool_))
    pending.pending_clear_slot(pmasks, 0, np.uint64(2))
    pending.rehash_pending(pkeys, pmasks, pexp, 0.0, pkeys.copy(), pmasks.copy(), pexp.copy())
    column = np.ones(4)
    costs.load_terms(8.0, column, column, column, column, column, 1.0, 1.0, 1.0, 1.0)
    costs.near_equals(column, column, column, column, column, column, 8.0, 0.1, 1.0, 1.0,
                      1.0, 1.0, 0.1)
    for floor in (column, np.zeros(0)):
        costs.load_gather(np.arange(4, dtype=np.intp), column, column, column, column, column,
                          column, floor)
    costs.rendezvous_pick(np.uint64(1), np.ones(4, np.uint64), np.arange(4, dtype=np.int64))
