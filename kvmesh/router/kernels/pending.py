"""The pending (speculative) blocks' table: routed, not yet confirmed by the worker's
KV events (numba; pure). Same open-addressing layout as the holder table, plus an
expiry per row; ``pending_match`` extends a prompt's confirmed match with them."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from kvmesh.router.kernels.tables import _U0, _U1, Array, _find, _key, _slot_for, match


# A pending table is a holder table plus an expiry per row: a row counts until its
# expiry, which every new mark pushes out (pending is a hint that lasts at least the
# TTL). Expired and emptied rows are dropped when the table is rebuilt.
@njit(cache=True, nogil=True)
def pending_mark(keys: Array, masks: Array, expiry: Array, held_keys: Array,
                 held_masks: Array, hashes: Array, positions: Array, word: int, bit: Any,
                 now: float, until: float) -> int:
    """Mark ``hashes[positions]`` pending on (``word``, ``bit``) until ``until`` (a row
    shared with other workers' live marks keeps the later expiry), except blocks the
    worker already holds. Returns how many rows were added."""
    added = 0
    for p in positions:
        key = _key(hashes[p])
        held = _find(held_keys, key)
        if held >= 0 and (held_masks[held, word] & bit) != _U0:
            continue
        i = _slot_for(keys, key)
        if keys[i] == _U0:
            keys[i] = key
            masks[i, :] = _U0
            expiry[i] = until
            added += 1
        elif expiry[i] < now:
            masks[i, :] = _U0
            expiry[i] = until
        else:  # a shorter mark for another worker must not cut a live one short
            expiry[i] = max(expiry[i], until)
        masks[i, word] |= bit
    return added


@njit(cache=True, nogil=True)
def pending_clear(keys: Array, masks: Array, hashes: Array, word: int, bit: Any) -> None:
    """Confirmed blocks stop being pending for (``word``, ``bit``)."""
    for n in range(hashes.shape[0]):
        i = _find(keys, _key(hashes[n]))
        if i >= 0:
            masks[i, word] &= ~bit


@njit(cache=True, nogil=True)
def pending_clear_slot(masks: Array, word: int, bit: Any) -> None:
    """A removed worker's marks go everywhere."""
    for i in range(masks.shape[0]):
        masks[i, word] &= ~bit


@njit(cache=True, nogil=True)
def rehash_pending(keys: Array, masks: Array, expiry: Array, now: float, new_keys: Array,
                   new_masks: Array, new_expiry: Array) -> int:
    """Copy the live rows (unexpired, some bit set) into the new table; returns them."""
    words = masks.shape[1]
    live = 0
    for i in range(keys.shape[0]):
        key = keys[i]
        if key == _U0 or expiry[i] < now or not masks[i].any():
            continue
        j = _slot_for(new_keys, key)
        new_keys[j] = key
        new_masks[j, :words] = masks[i, :]
        new_expiry[j] = expiry[i]
        live += 1
    return live


@njit(cache=True, inline="always")
def _pending_row(keys: Array, expiry: Array, key: Any, now: float) -> int:
    i = _find(keys, key)
    if i >= 0 and expiry[i] < now:
        return -1
    return i


@njit(cache=True, nogil=True)
def pending_match(keys: Array, masks: Array, expiry: Array, now: float, hashes: Array,
                  checkpoints: Array, stride: int, alive: Array, depth: Array) -> None:
    """Deepen ``depth`` (per slot set in ``alive``) with pending marks. Marks sit at
    checkpoints, and a chained hash pending at position p means the worker will hold
    the whole prefix up to p; past a worker's deepest checkpoint its marks are followed
    block by block (the tail of a pending prompt this one extends), for at most one
    stride."""
    words = alive.shape[0]
    n = hashes.shape[0]
    for c in checkpoints:
        i = _pending_row(keys, expiry, _key(hashes[c]), now)
        if i < 0:
            continue
        for w in range(min(words, masks.shape[1])):
            marked = masks[i, w] & alive[w]
            if marked == _U0:
                continue
            for s in range(64):
                if (marked >> np.uint64(s)) & _U1 and depth[w * 64 + s] <= c:
                    depth[w * 64 + s] = c + 1
    for w in range(min(words, masks.shape[1])):
        if alive[w] == _U0:
            continue
        for s in range(64):
            if not (alive[w] >> np.uint64(s)) & _U1:
                continue
            slot = w * 64 + s
            position = depth[slot]
            stop = min(n, position + stride)
            while position < stop:
                i = _pending_row(keys, expiry, _key(hashes[position]), now)
                if i < 0 or not (masks[i, w] >> np.uint64(s)) & _U1:
                    break
                position += 1
            depth[slot] = position


@njit(cache=True, nogil=True)
def match_counts(keys: Array, masks: Array, pkeys: Array, pmasks: Array, pexpiry: Array,
                 now: float, with_pending: bool, hashes: Array, checkpoints: Array,
                 stride: int, alive: Array, at: Array, held: Array) -> Array:
    """The prefix index's ``match_array`` in one compiled call: each listed worker's
    leading ``hashes`` held (``tables.match``), deepened by its unexpired pending marks
    when ``with_pending`` (``pending_match``), read at its slot ``at`` (0 where
    ``held`` is false: a worker the table has no slot for). ``alive`` (the listed
    slots' bitmask words) is left as it was: the walks clear their copies of it."""
    depth = np.zeros(masks.shape[1] * 64, np.int32)
    match(keys, masks, hashes, alive.copy(), depth)
    if with_pending:
        pending_match(pkeys, pmasks, pexpiry, now, hashes, checkpoints, stride,
                      alive.copy(), depth)
    counts = np.zeros(at.shape[0], np.int64)
    for j in range(at.shape[0]):
        if held[j]:
            counts[j] = depth[at[j]]
    return counts
