"""What a simulated run measures: per-policy results and the oracle's best prefix."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmesh.bench.stats import ttft_summary


def best_prefix(holders: dict[int, set[str]], hashes: list[int]) -> int:
    """Blocks of ``hashes`` the best single worker holds as a prefix (the oracle), from
    the fleet's block → holders map: the holders of every block so far, intersected."""
    alive: set[str] | None = None
    depth = 0
    for h in hashes:
        held = holders.get(h)
        if not held:
            break
        alive = set(held) if alive is None else alive & held
        if not alive:
            break
        depth += 1
    return depth


@dataclass
class PolicyResult:
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    oracle_tokens: int = 0
    output_tokens: int = 0
    first_arrival: float = 0.0
    last_done: float = 0.0

    def summary(self) -> dict[str, float]:
        return {
            **ttft_summary(self.ttfts),
            "throughput_tok_s": round(
                self.output_tokens / max(self.last_done - self.first_arrival, 1e-9), 1),
            "hit_rate": round(self.cached_tokens / max(self.prompt_tokens, 1), 4),
            "oracle_hit_rate": round(self.oracle_tokens / max(self.prompt_tokens, 1), 4),
        }
