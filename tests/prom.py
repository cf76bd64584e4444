"""Reading Prometheus scrapes in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One /metrics scrape: samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    @classmethod
    def of(cls, address: str) -> Scrape:
        reply = httpx.get(f"http://{address}/metrics", timeout=10)
        reply.raise_for_status()
        return cls(reply.text)

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(v for n, ls, v in self.samples
                   if n == name and all(ls.get(k) == want for k, want in labels.items()))

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and all(ls.get(k) == want for k, want in labels.items())
                   for n, ls, _ in self.samples)
