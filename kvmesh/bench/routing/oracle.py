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


def oracle_hit_rate(prompts: Iterable[Sequence[int]], block_size: int) -> float:
    seen: set[int] = set()
    seed = namespace_seed("oracle")
    hits = total = 0
    for prompt in prompts:
        hashes = prompt_hashes(list(prompt), block_size, seed)
        usable = max(len(prompt) - 1, 0) // block_size
        depth = 0
        while depth < usable and hashes[depth] in seen:
            depth += 1
        hits += depth * block_size
        total += len(prompt)
        seen.update(hashes)
    return hits / total if total else 0.0
