"""Chained block hashes over token ids, vectorised with numpy (pure).

The router hashes prompts itself, so its index never depends on the engine's hash
seed. A block's hash covers every token from the start of the prompt to the block's
end, at its position: ``H_i = mix(S_i, i)`` where ``S_i`` is the wrapping uint64 sum of
``f(token_k, k)`` over all tokens ``k`` of blocks ``0..i`` and ``f`` is a
splitmix64-style mixer seeded per (model, adapter) namespace. Sums make the chain a
``cumsum``: hashing an 8k-token prompt is a handful of numpy calls, and a chain can be
extended from a parent's ``(S, blocks)`` state when the engine reports new blocks.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import numpy as np

_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xBF58476D1CE4E5B9)
_C3 = np.uint64(0x94D049BB133111EB)
_POS = np.uint64(0xD6E8FEB86659FD93)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)

U64Array = np.ndarray[Any, np.dtype[np.uint64]]


def _mix(x: U64Array) -> U64Array:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps)."""
    x = (x ^ (x >> _S30)) * _C2
    x = (x ^ (x >> _S27)) * _C3
    return x ^ (x >> _S31)


def namespace_seed(model: str, adapter: str = "") -> int:
    """A stable 64-bit seed per (model, adapter): their blocks never collide."""
    digest = hashlib.blake2b(f"{model}\x00{adapter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ChainState(NamedTuple):
    """Where a chain ends: the running sum and how many blocks it covers.

    A named tuple, not a dataclass: the index keeps one per cached block, so its size
    and construction time are the router's memory and event-ingestion costs."""

    total: int = 0
    blocks: int = 0


ROOT = ChainState()


def chain_arrays(
    token_ids: Any, block_size: int, seed: int, parent: ChainState = ROOT
) -> tuple[U64Array, U64Array]:
    """Block hashes and running sums (uint64 arrays) continuing ``parent``'s chain."""
    tokens = as_tokens(token_ids).astype(np.uint64)
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty
    tokens = tokens[: n_blocks * block_size]
    start = parent.blocks * block_size
    positions = np.arange(start, start + len(tokens), dtype=np.uint64)
    with np.errstate(over="ignore"):
        terms = _mix(tokens * _C1 ^ positions * _POS ^ np.uint64(seed))
        block_sums = terms.reshape(n_blocks, block_size).sum(axis=1, dtype=np.uint64)
        sums = np.cumsum(block_sums, dtype=np.uint64) + np.uint64(parent.total)
        index = np.arange(parent.blocks + 1, parent.blocks + n_blocks + 1, dtype=np.uint64)
        hashes = _mix(sums ^ (index * _C1))
    return hashes, sums


def chain_hashes(
    token_ids: Any, block_size: int, seed: int, parent: ChainState = ROOT
) -> tuple[list[int], list[ChainState]]:
    """Hashes of the full blocks of ``token_ids`` continuing ``parent``'s chain.

    Returns the block hashes and the chain state after each block (to extend later).
    A trailing partial block is ignored: engines cache only full blocks.
    """
    hashes, sums = chain_arrays(token_ids, block_size, seed, parent)
    states = [ChainState(int(s), parent.blocks + i + 1) for i, s in enumerate(sums.tolist())]
    return hashes.tolist(), states


def as_tokens(token_ids: Any) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """Token ids as a uint32 array (no copy when they already are one)."""
    if isinstance(token_ids, np.ndarray):
        return token_ids.astype(np.uint32, copy=False)
    return np.array(token_ids, dtype=np.uint32)


def prompt_hashes(token_ids: Any, block_size: int, seed: int) -> list[int]:
    """Block hashes of a whole prompt (the routing hot path)."""
    result: list[int] = chain_arrays(token_ids, block_size, seed)[0].tolist()
    return result
