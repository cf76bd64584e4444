"""Where a routed prompt is looked up and marked pending in the prefix index (pure):
block positions only, no tables. Chained hashes make a few positions enough — a block
at position k matches only if every block before it does."""

from __future__ import annotations

import functools

import numpy as np

CHECKPOINT_STRIDE = 16


def checkpoints(n_blocks: int) -> list[int]:
    """Block positions a prompt is looked up at for pending marks: 0, 1, 3, 7, 15, then
    every 16th block, and the last one."""
    out: list[int] = []
    k = 1
    while k <= min(n_blocks, CHECKPOINT_STRIDE):
        out.append(k - 1)
        k *= 2
    out.extend(range(2 * CHECKPOINT_STRIDE - 1, n_blocks, CHECKPOINT_STRIDE))
    if n_blocks and out[-1] != n_blocks - 1:
        out.append(n_blocks - 1)
    return out


def mark_positions(n_blocks: int) -> list[int]:
    """Where a routed prompt leaves pending marks: its checkpoints plus every block of
    its tail after the last full stride, so a later prompt that extends it (the next
    turn of a conversation) finds its exact length by scanning at most one stride."""
    marks = checkpoints(n_blocks)
    tail_start = max((n_blocks - 1) // CHECKPOINT_STRIDE * CHECKPOINT_STRIDE, 0)
    return sorted(set(marks) | set(range(tail_start, n_blocks)))


@functools.lru_cache(maxsize=1024)
def block_positions(n_blocks: int, marks: bool) -> np.ndarray:
    positions = mark_positions(n_blocks) if marks else checkpoints(n_blocks)
    return np.array(positions, dtype=np.int64)
