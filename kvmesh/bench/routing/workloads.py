"""Seeded, reproducible routing workloads (token-id prompts with arrival times)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt: tuple[int, ...]
    output_tokens: int


VOCAB = 49_000


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, VOCAB) for _ in range(n)]


def _poisson_times(rng: random.Random, n: int, rate: float) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def shared_prefix(rng: random.Random, n: int, rate: float, tenants: int = 48,
                  users: int = 8, system_len: int = 1024, zipf: float = 1.0) -> list[SimRequest]:
    """Many tenants × users; each tenant's long system prompt is shared (Zipf-hot)."""
    systems = [_tokens(rng, system_len) for _ in range(tenants)]
    profiles = [[_tokens(rng, 64) for _ in range(users)] for _ in range(tenants)]
    weights = [1 / (i + 1) ** zipf for i in range(tenants)]
    out = []
    for t in _poisson_times(rng, n, rate):
        k = rng.choices(range(tenants), weights)[0]
        prompt = systems[k] + rng.choice(profiles[k]) + _tokens(rng, 32)
        out.append(SimRequest(t, tuple(prompt), rng.randint(16, 64)))
    return out


def multi_turn(rng: random.Random, n: int, rate: float,
               sessions: int = 64) -> list[SimRequest]:
    """Conversations that grow: every turn resends the history plus a new message."""
    history = [_tokens(rng, 256) for _ in range(sessions)]
    out = []
    for t in _poisson_times(rng, n, rate):
        s = rng.randrange(sessions)
        history[s] = history[s] + _tokens(rng, rng.randint(16, 64))
        answer = rng.randint(16, 64)
        out.append(SimRequest(t, tuple(history[s]), answer))
        history[s] = history[s] + _tokens(rng, answer)
        if len(history[s]) > 3000:
            history[s] = _tokens(rng, 256)
    return out


def low_reuse(rng: random.Random, n: int, rate: float) -> list[SimRequest]:
    """Nothing to reuse: every prompt is new."""
    return [SimRequest(t, tuple(_tokens(rng, rng.randint(200, 1200))), rng.randint(16, 64))
            for t in _poisson_times(rng, n, rate)]


def bursty(rng: random.Random, n: int, rate: float) -> list[SimRequest]:
    """Shared-prefix traffic arriving in bursts of 16 near-simultaneous requests."""
    base = shared_prefix(rng, n, rate)
    out = []
    for i, r in enumerate(base):
        burst_start = base[i - i % 16].arrival_s
        out.append(SimRequest(burst_start + 0.001 * (i % 16), r.prompt, r.output_tokens))
    return out


def hot_set(rng: random.Random, n: int, rate: float, tenants: int = 40,
            system_len: int = 768, doc_len: int = 384) -> list[SimRequest]:
    """One system prompt shared by every tenant, then each tenant's own document,
    requested uniformly: the hot set (system + every document) is sized to outgrow one
    worker's KV cache but fit in two (``--num-kv-blocks``), and the shared system
    prompt is most of every prompt, so prefix affinity alone piles it onto one cache."""
    system = _tokens(rng, system_len)
    docs = [_tokens(rng, doc_len) for _ in range(tenants)]
    return [SimRequest(t, tuple(system + docs[rng.randrange(tenants)] + _tokens(rng, 32)),
                       rng.randint(16, 64))
            for t in _poisson_times(rng, n, rate)]


def rag_zipf(rng: random.Random, n: int, rate: float, tenants: int = 48,
             system_len: int = 512, doc_len: int = 1024, zipf: float = 0.8) -> list[SimRequest]:
    """Retrieval-style traffic: one shared system prompt, then one of ``tenants`` long
    documents with Zipf popularity, a short question and a short answer, so prefill
    is most of the work and every document miss costs about a request's worth of it.
    The hot set (system + documents, 16 + 48 × 32 blocks of 32) is sized to outgrow
    one worker's cache at ``--num-kv-blocks 1024`` but fit in two."""
    system = _tokens(rng, system_len)
    docs = [_tokens(rng, doc_len) for _ in range(tenants)]
    weights = [1 / (i + 1) ** zipf for i in range(tenants)]
    order = list(range(tenants))
    rng.shuffle(order)  # popularity rank independent of anything a router could see
    out = []
    for t in _poisson_times(rng, n, rate):
        doc = docs[order[rng.choices(range(tenants), weights)[0]]]
        out.append(SimRequest(t, tuple(system + doc + _tokens(rng, 32)), rng.randint(8, 16)))
    return out


def prefix_repetition(rng: random.Random, n: int, rate: float, prefixes: int = 32,
                      prefix_len: int = 2048, suffix_len: int = 256,
                      output_len: int = 64) -> list[SimRequest]:
    """vLLM's ``prefix_repetition`` dataset (``vllm bench serve --dataset-name
    prefix_repetition``): ``prefixes`` random prefixes of ``prefix_len`` tokens, each
    followed in n // prefixes requests by its own random ``suffix_len`` tokens, every
    request answering ``output_len`` tokens, in shuffled order. The default hot set
    (32 × 2048 tokens) outgrows one CPU worker's 1 GiB KV cache (~46k SmolLM2 tokens) but
    fits in two; ``prefix_repetition_chat`` is the mild variant (few prefixes that fit)."""
    per_prefix = n // prefixes
    if per_prefix == 0:
        raise ValueError(f"{n} requests cannot cover {prefixes} prefixes")
    heads = [_tokens(rng, prefix_len) for _ in range(prefixes)]
    prompts = [head + _tokens(rng, suffix_len) for head in heads for _ in range(per_prefix)]
    rng.shuffle(prompts)
    return [SimRequest(t, tuple(p), output_len)
            for t, p in zip(_poisson_times(rng, len(prompts), rate), prompts, strict=True)]


def prefix_repetition_chat(rng: random.Random, n: int, rate: float) -> list[SimRequest]:
    """The mild variant: 4 prefixes of 512 tokens (the hot set fits in one worker),
    128-token suffixes, 128-token answers — a chat workload."""
    return prefix_repetition(rng, n, rate, prefixes=4, prefix_len=512, suffix_len=128,
                             output_len=128)


_MAKERS: dict[str, Callable[[random.Random, int, float], list[SimRequest]]] = {
    "shared_prefix": shared_prefix, "multi_turn": multi_turn, "low_reuse": low_reuse,
    "bursty": bursty, "hot_set": hot_set, "rag_zipf": rag_zipf,
    "prefix_repetition": prefix_repetition, "prefix_repetition_chat": prefix_repetition_chat}
WORKLOADS = tuple(_MAKERS)


def make_workload(name: str, n: int, rate: float, seed: int) -> list[SimRequest]:
    """A named workload; ``prefix_repetition:PREFIXES:PREFIX_LEN:SUFFIX_LEN:OUTPUT_LEN``
    sizes vLLM's dataset as its flags would (--prefix-repetition-num-prefixes, ...)."""
    base, _, sizes = name.partition(":")
    if base == "prefix_repetition" and sizes:
        try:
            prefixes, prefix_len, suffix_len, output_len = (int(v) for v in sizes.split(":"))
        except ValueError:
            raise ValueError(f"{name!r}: give prefix_repetition:PREFIXES:PREFIX_LEN:"
                             "SUFFIX_LEN:OUTPUT_LEN (four integers)") from None
        return prefix_repetition(random.Random(seed), n, rate, prefixes, prefix_len,
                                 suffix_len, output_len)
    maker = _MAKERS.get(name)
    if maker is None:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} "
                         "or prefix_repetition:PREFIXES:PREFIX_LEN:SUFFIX_LEN:OUTPUT_LEN")
    return maker(random.Random(seed), n, rate)
