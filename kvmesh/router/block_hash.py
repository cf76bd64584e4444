"""Chained block hashes over token ids, compiled (``kernels.tables.chain``; pure).

The router hashes prompts itself, so its index never depends on the engine's hash
seed. A block's hash covers every token from the start of the prompt to the block's
end, at its position: ``H_i = mix(S_i, i)`` where ``S_i`` is the wrapping uint64 sum of
``f(token_k, k)`` over all tokens ``k`` of blocks ``0..i`` and ``f`` is a
splitmix64-style mixer seeded per (model, adapter) namespace. One compiled pass hashes
an 8k-token prompt in microseconds, and a chain can be extended from a parent's
``(S, blocks)`` state when the engine reports new blocks.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from kvmesh.router.kernels import tables

U64Array = np.ndarray[Any, np.dtype[np.uint64]]
#: A prompt's token ids: a list, or the uint32 buffer a packed Route request carries.
TokenIds = Sequence[int] | np.ndarray[Any, np.dtype[Any]]


@functools.lru_cache(maxsize=4096)
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
    hashes, sums = tables.chain(as_tokens(token_ids), block_size, np.uint64(seed),
                                 np.uint64(parent.total), parent.blocks)
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


def prompt_hash_array(token_ids: Any, block_size: int, seed: int) -> U64Array:
    """Block hashes of a whole prompt as a uint64 array (the routing hot path)."""
    return chain_arrays(token_ids, block_size, seed)[0]


def prompt_hashes(token_ids: Any, block_size: int, seed: int) -> list[int]:
    """Block hashes of a whole prompt as ints."""
    result: list[int] = chain_arrays(token_ids, block_size, seed)[0].tolist()
    return result
