"""Hash chains, the holder and engine tables, and matching (numba; pure).

Everything here works on flat numpy arrays, so the index costs a few bytes per block
and no Python objects (nothing for the garbage collector to walk):

- ``chain``: chained block hashes of a token array (see ``block_hash``).
- Open-addressing hash tables with linear probing and backward-shift deletion
  (Knuth's algorithm R, no tombstones). Key 0 marks an empty slot; a real key 0 is
  stored as ``ZERO_KEY``.
  * the *holder* table: router block hash -> bitmask of worker slots (``words``
    uint64s per row);
  * one *engine* table per worker: engine block hash -> (chain sum, chain length),
    from which the router hash follows (``router_hash``).
- ``match``: walk a prompt's hashes through the holder table and report, for every
  live worker slot, how many leading blocks it holds.

All arithmetic is uint64 and wraps; numba compiles each kernel once and caches it on
disk (``cache=True``); ``kvmesh.router.kernels.warm_up`` compiles them all ahead of the
first request. The pending (speculative) blocks' table is in ``pending.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

C1 = np.uint64(0x9E3779B97F4A7C15)
C2 = np.uint64(0xBF58476D1CE4E5B9)
C3 = np.uint64(0x94D049BB133111EB)
POS = np.uint64(0xD6E8FEB86659FD93)
ZERO_KEY = np.uint64(0x5BD1E9955BD1E995)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)

Array = np.ndarray[Any, Any]


@njit(cache=True, inline="always")
def mix(x: Any) -> Any:
    """splitmix64's finaliser."""
    x = (x ^ (x >> _S30)) * C2
    x = (x ^ (x >> _S27)) * C3
    return x ^ (x >> _S31)


@njit(cache=True, inline="always")
def router_hash(total: Any, length: Any) -> Any:
    """The router hash of the block that ends a chain with running sum ``total`` after
    ``length`` blocks."""
    return mix(total ^ (np.uint64(length) * C1))


@njit(cache=True, nogil=True)
def chain(tokens: Array, block_size: int, seed: Any, parent_total: Any,
          parent_blocks: int) -> tuple[Array, Array]:
    """Block hashes and running sums of the full blocks of ``tokens`` (uint32),
    continuing a chain that ended after ``parent_blocks`` blocks with sum
    ``parent_total``.

    Two passes: every token's term first (independent of each other, so the compiler
    runs several at once in vector registers), then each block's sum of them (uint64
    addition wraps and is associative, so the sums are the token-by-token ones). One
    pass adding each term to the running total as it went was ~30% slower for an
    8k-token prompt: one long chain of dependent additions."""
    n_blocks = tokens.shape[0] // block_size
    terms = np.empty(n_blocks * block_size, np.uint64)
    seed = np.uint64(seed)
    base = np.uint64(parent_blocks * block_size)
    for k in range(terms.shape[0]):
        terms[k] = mix((np.uint64(tokens[k]) * C1) ^ ((base + np.uint64(k)) * POS) ^ seed)
    hashes = np.empty(n_blocks, np.uint64)
    sums = np.empty(n_blocks, np.uint64)
    total = np.uint64(parent_total)
    for b in range(n_blocks):
        total += terms[b * block_size:(b + 1) * block_size].sum()
        sums[b] = total
        hashes[b] = router_hash(total, parent_blocks + b + 1)
    return hashes, sums


# ---- tables ------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _key(key: Any) -> Any:
    key = np.uint64(key)
    return ZERO_KEY if key == _U0 else key


@njit(cache=True, inline="always")
def _home(key: Any, mask: int) -> Any:
    return np.int64(mix(key) & np.uint64(mask))


@njit(cache=True, inline="always")
def _find(keys: Array, key: Any) -> int:
    """Slot of ``key`` (already normalised), or -1."""
    mask = keys.shape[0] - 1
    i = _home(key, mask)
    while True:
        k = keys[i]
        if k == key:
            return i
        if k == _U0:
            return -1
        i = (i + 1) & mask


@njit(cache=True, inline="always")
def _slot_for(keys: Array, key: Any) -> int:
    """Slot of ``key`` or of the empty slot where it goes (the table is never full)."""
    mask = keys.shape[0] - 1
    i = _home(key, mask)
    while keys[i] != key and keys[i] != _U0:
        i = (i + 1) & mask
    return i


@njit(cache=True, inline="always")
def _hole_fill_source(keys: Array, hole: int) -> int:
    """Backward-shift deletion: the next slot after ``hole`` whose key may move into it,
    or -1 when the probe run ends first."""
    mask = keys.shape[0] - 1
    j = hole
    while True:
        j = (j + 1) & mask
        k = keys[j]
        if k == _U0:
            return -1
        home = _home(k, mask)
        # k may move back to the hole unless its home lies cyclically in (hole, j].
        if hole <= j:
            if hole < home <= j:
                continue
        elif home > hole or home <= j:
            continue
        return j


@njit(cache=True)
def _delete_engine(keys: Array, sums: Array, lens: Array, i: int) -> None:
    while True:
        j = _hole_fill_source(keys, i)
        if j < 0:
            keys[i] = _U0
            return
        keys[i], sums[i], lens[i] = keys[j], sums[j], lens[j]
        i = j


@njit(cache=True)
def _delete_holder(keys: Array, masks: Array, i: int) -> None:
    while True:
        j = _hole_fill_source(keys, i)
        if j < 0:
            keys[i] = _U0
            masks[i, :] = _U0
            return
        keys[i] = keys[j]
        masks[i, :] = masks[j, :]
        i = j


@njit(cache=True, nogil=True)
def holder_set(keys: Array, masks: Array, hashes: Array, word: int, bit: Any,
               seen: Array) -> int:
    """Set ``bit`` (in column ``word``) for each of ``hashes``; ``seen[i]`` tells whether
    it was already set. Returns how many keys were new to the table."""
    added = 0
    for n in range(hashes.shape[0]):
        key = _key(hashes[n])
        i = _slot_for(keys, key)
        added += keys[i] == _U0  # a new row: the key was not in the table
        keys[i] = key
        seen[n] = (masks[i, word] & bit) != _U0
        masks[i, word] |= bit
    return added


@njit(cache=True, nogil=True)
def holder_clear(keys: Array, masks: Array, hashes: Array, word: int, bit: Any) -> int:
    """Clear ``bit`` for each of ``hashes``; rows left empty are deleted. Returns how many
    rows were deleted."""
    deleted = 0
    for n in range(hashes.shape[0]):
        i = _find(keys, _key(hashes[n]))
        if i < 0:
            continue
        masks[i, word] &= ~bit
        if not masks[i].any():
            _delete_holder(keys, masks, i)
            deleted += 1
    return deleted


@njit(cache=True, nogil=True)
def engine_put(keys: Array, sums: Array, lens: Array, engine_hashes: Array,
               totals: Array, first_length: int, fresh: Array) -> int:
    """Insert engine hashes with their chain states (lengths ``first_length``,
    ``first_length + 1``, ...); known hashes are left alone (``fresh[n]`` False).
    Returns how many were inserted."""
    inserted = 0
    for n in range(engine_hashes.shape[0]):
        key = _key(engine_hashes[n])
        i = _slot_for(keys, key)
        if keys[i] == key:
            fresh[n] = False
            continue
        keys[i] = key
        sums[i] = totals[n]
        lens[i] = first_length + n
        fresh[n] = True
        inserted += 1
    return inserted


@njit(cache=True, nogil=True)
def engine_put_states(keys: Array, sums: Array, lens: Array, engine_hashes: Array,
                      totals: Array, lengths: Array) -> None:
    """Insert engine hashes with explicit chain states (snapshot restore)."""
    for n in range(engine_hashes.shape[0]):
        key = _key(engine_hashes[n])
        i = _slot_for(keys, key)
        keys[i] = key
        sums[i] = totals[n]
        lens[i] = lengths[n]


@njit(cache=True, nogil=True)
def engine_get(keys: Array, sums: Array, lens: Array, engine_hash: Any) -> tuple[Any, Any]:
    """The chain state (sum, length) after a known engine block, or (0, -1)."""
    i = _find(keys, _key(engine_hash))
    if i < 0:
        return _U0, -1
    return sums[i], np.int64(lens[i])


@njit(cache=True, nogil=True)
def engine_pop(keys: Array, sums: Array, lens: Array, engine_hashes: Array,
               out: Array) -> int:
    """Delete engine hashes; their router hashes go to ``out[:count]``."""
    count = 0
    for n in range(engine_hashes.shape[0]):
        i = _find(keys, _key(engine_hashes[n]))
        if i < 0:
            continue
        out[count] = router_hash(sums[i], lens[i])
        count += 1
        _delete_engine(keys, sums, lens, i)
    return count


@njit(cache=True, nogil=True)
def engine_items(keys: Array, sums: Array, lens: Array) -> tuple[Array, Array, Array, Array]:
    """Every entry: engine hashes, router hashes, chain sums, chain lengths."""
    taken = np.flatnonzero(keys)
    n = taken.shape[0]
    engine, router = np.empty(n, np.uint64), np.empty(n, np.uint64)
    totals, lengths = np.empty(n, np.uint64), np.empty(n, np.uint32)
    for m in range(n):
        i = taken[m]
        key = keys[i]
        engine[m] = _U0 if key == ZERO_KEY else key
        router[m] = router_hash(sums[i], lens[i])
        totals[m], lengths[m] = sums[i], lens[i]
    return engine, router, totals, lengths


@njit(cache=True, nogil=True)
def rehash_engine(keys: Array, sums: Array, lens: Array, new_keys: Array, new_sums: Array,
                  new_lens: Array) -> None:
    for i in range(keys.shape[0]):
        key = keys[i]
        if key != _U0:
            j = _slot_for(new_keys, key)
            new_keys[j], new_sums[j], new_lens[j] = key, sums[i], lens[i]


@njit(cache=True, nogil=True)
def rehash_holders(keys: Array, masks: Array, new_keys: Array, new_masks: Array) -> None:
    words = masks.shape[1]
    for i in range(keys.shape[0]):
        key = keys[i]
        if key != _U0:
            j = _slot_for(new_keys, key)
            new_keys[j] = key
            new_masks[j, :words] = masks[i, :]


# ---- matching ----------------------------------------------------------------------
@njit(cache=True, nogil=True)
def match(keys: Array, masks: Array, hashes: Array, alive: Array, depth: Array) -> None:
    """For every slot set in ``alive`` (uint64 words, consumed), ``depth[slot]`` = how
    many leading ``hashes`` that slot holds."""
    words = alive.shape[0]
    n = hashes.shape[0]
    for b in range(n):
        i = _find(keys, _key(hashes[b]))
        left = _U0
        for w in range(words):
            still = alive[w] & masks[i, w] if i >= 0 else _U0
            dropped = alive[w] ^ still
            if dropped != _U0:
                for s in range(64):
                    if (dropped >> np.uint64(s)) & _U1:
                        depth[w * 64 + s] = b
                alive[w] = still
            left |= still
        if left == _U0:
            return
    for w in range(words):
        if alive[w] != _U0:
            for s in range(64):
                if (alive[w] >> np.uint64(s)) & _U1:
                    depth[w * 64 + s] = n
