"""The oracle hit rate of a real-mode run (pure).

Real engines cannot be looked into at the moment each request is scheduled, so the
oracle replays the requests' token ids against one unbounded fleet-wide cache: each
request hits the longest prefix any earlier request computed (like vLLM, never its
last token). That is every router's upper bound — only first-time blocks miss — and
it is attainable when the workload's hot set fits in the fleet's KV caches together
(the ``hot_set`` workload is sized so with ``--num-kv-blocks``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvmesh.router.block_hash import namespace_seed, prompt_hashes


def oracle_hits(prompts: Iterable[Sequence[int]], block_size: int) -> list[int]:
    """Per request, in order: the prompt tokens the unbounded fleet-wide cache holds."""
    seen: set[int] = set()
    seed = namespace_seed("oracle")
    hits = []
    for prompt in prompts:
        hashes = prompt_hashes(list(prompt), block_size, seed)
        usable = max(len(prompt) - 1, 0) // block_size
        depth = 0
        while depth < usable and hashes[depth] in seen:
            depth += 1
        hits.append(depth * block_size)
        seen.update(hashes)
    return hits


def oracle_hit_rate(prompts: Iterable[Sequence[int]], block_size: int) -> float:
    listed = [list(p) for p in prompts]
    total = sum(map(len, listed))
    return sum(oracle_hits(listed, block_size)) / total if total else 0.0
