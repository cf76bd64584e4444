"""KV-aware routing on real vLLM workers: events reach the router, prefixes stick."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from pydantic import SecretStr
from smg_grpc_proto import vllm_engine_pb2_grpc
from smg_grpc_proto.generated import common_pb2
from transformers import AutoTokenizer

from kvmesh.core.internal_auth import token_metadata
from kvmesh.core.security_config import INTERNAL_TOKEN_ENV
from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from kvmesh.v1 import common_pb2 as kvmesh_common_pb2
from kvmesh.v1 import router_pb2, router_pb2_grpc
from tests.prom import Scrape
from tests.router_client import list_workers

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e

SYSTEM = (
    "You are the support assistant of the Lighthouse Museum. "
    + " ".join(f"Rule {i}: answer politely and mention exhibit number {i}." for i in range(60))
)


def _route(router: str, token_ids: list[int]) -> router_pb2.RouteDecision:
    async def run() -> router_pb2.RouteDecision:
        async with grpc.aio.insecure_channel(router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            decision = await stub.Route(router_pb2.RouteRequest(
                request_id=f"probe-{time.monotonic_ns()}", model=MODEL, token_ids=token_ids),
                timeout=5)
            await stub.RequestFinished(router_pb2.RequestFinishedRequest(
                request_id="probe", worker_id=decision.worker.worker_id))
            return decision

    return asyncio.run(run())


def test_shared_prefix_goes_to_the_worker_that_cached_it(
    kvmesh_up: UpProcess, model_dir: Path
) -> None:
    router = kvmesh_up.state["router"]
    client = openai.OpenAI(base_url=kvmesh_up.state["http"], api_key="x", max_retries=0)
    before = {s.worker.worker_id: s.indexed_blocks for s in list_workers(router)}

    def ask(question: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=MODEL, max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": question}])

    first = ask("Where is the cafe?")
    assert first.usage.prompt_tokens > 600
    # The engine's BlockStored events reach the router's index.
    deadline = time.monotonic() + 20
    holder = None
    while time.monotonic() < deadline and holder is None:
        for s in list_workers(router):
            if s.indexed_blocks - before.get(s.worker.worker_id, 0) >= 600 // 32:
                holder = s.worker.worker_id
        time.sleep(0.1)
    if holder is None:
        kvmesh_up.dump()  # the workers' and router's logs: why no event arrived
    assert holder is not None, list_workers(router)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    follow_up = [{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": "When do you open?"}]
    ids = tok.encode(tok.apply_chat_template(follow_up, tokenize=False,
                                             add_generation_prompt=True),
                     add_special_tokens=False)
    decision = _route(router, ids)
    assert decision.policy == "kv_aware"
    assert decision.worker.worker_id == holder
    assert decision.reason == "kv_aware:prefix"
    assert decision.expected_cached_tokens >= 600 // 32 * 32

    # And vLLM's own prefix-cache hits agree, request after request: in each reply's
    # usage and in the holder engine's prefix-cache hit counter.
    hits_before = _prefix_cache_hits(kvmesh_up, holder)
    for question in ("When do you open?", "Is there parking?", "Can I bring a dog?"):
        reply = ask(question)
        assert reply.usage.prompt_tokens_details.cached_tokens >= 600 // 32 * 32
    assert _prefix_cache_hits(kvmesh_up, holder) - hits_before >= 3 * (600 // 32 * 32)


def _prefix_cache_hits(kvmesh_up: UpProcess, worker_id: str) -> float:
    """``vllm:prefix_cache_hits_total`` (tokens) of one worker, found through the
    gateway's Prometheus service discovery."""
    base = kvmesh_up.state["http"].removesuffix("/v1")
    for group in httpx.get(base + "/sd/prometheus", timeout=10).json():
        if group["labels"].get("kvmesh_worker") == worker_id:
            return Scrape.of(group["targets"][0]).total("vllm:prefix_cache_hits_total")
    raise AssertionError(f"no metrics target for worker {worker_id}")


def test_router_metrics_show_events_and_prefix_decisions(kvmesh_up: UpProcess) -> None:
    text = httpx.get(f"http://{kvmesh_up.state['router_metrics']}/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines() if line and not line.startswith("#")
    }
    assert samples['kvmesh_router_kv_event_blocks_total{kind="stored"}'] > 0
    assert samples['kvmesh_router_decisions_total{policy="kv_aware",reason="kv_aware:prefix"}'] >= 1
    assert samples["kvmesh_router_index_blocks"] > 0
    assert samples["kvmesh_router_kv_event_lag_seconds_count"] > 0


def test_an_idle_workers_event_stream_beats_before_its_first_batch(
        kvmesh_up: UpProcess) -> None:
    """A fresh subscription to an idle real worker carries load-only heartbeats
    (numbered 0) before any batch: the router never mistakes the silent stream for a
    stalled one, so it never resubscribes and loses the batch published in between."""
    endpoint = kvmesh_up.state["workers"][0]["endpoint"]

    async def first_message() -> common_pb2.KvEventBatch:
        """The first message after the snapshot of what the worker holds (sent first
        when it has published before: earlier tests of the session used it)."""
        async with grpc.aio.insecure_channel(endpoint) as channel:
            call = vllm_engine_pb2_grpc.VllmEngineStub(channel).SubscribeKvEvents(
                common_pb2.SubscribeKvEventsRequest(load_records_before_first_batch=True))
            try:
                while True:
                    message = await asyncio.wait_for(call.read(), 5)
                    if not message.HasField("snapshot"):
                        return message
            finally:
                call.cancel()

    beat = asyncio.run(first_message())
    assert beat.load.load_only and not beat.events
    assert beat.load.max_running_requests > 0


def _subscribe(endpoint: str, start: int, count: int,
               heartbeats: bool = False) -> list[common_pb2.KvEventBatch]:
    """The first ``count`` messages of a subscription from ``start`` (load-only
    heartbeats skipped unless asked for; the stream's error raises)."""
    async def run() -> list[common_pb2.KvEventBatch]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            call = vllm_engine_pb2_grpc.VllmEngineStub(channel).SubscribeKvEvents(
                common_pb2.SubscribeKvEventsRequest(start_sequence_number=start))
            got: list[common_pb2.KvEventBatch] = []
            try:
                while len(got) < count:
                    # An idle engine's heartbeats come every 5 s (the relay's backoff).
                    message = await asyncio.wait_for(call.read(), 12)
                    if heartbeats or not (message.HasField("load") and message.load.load_only):
                        got.append(message)
            finally:
                call.cancel()
            return got

    return asyncio.run(run())


def _snapshot(endpoint: str) -> list[common_pb2.KvEventBatch]:
    """Every chunk of the snapshot a fresh subscription starts with (none: the worker
    published nothing yet, so only live batches would follow)."""
    async def run() -> list[common_pb2.KvEventBatch]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            call = vllm_engine_pb2_grpc.VllmEngineStub(channel).SubscribeKvEvents(
                common_pb2.SubscribeKvEventsRequest())
            chunks: list[common_pb2.KvEventBatch] = []
            try:
                while not chunks or len(chunks) < chunks[0].snapshot.count:
                    chunks.append(await asyncio.wait_for(call.read(), 3))
            except TimeoutError:
                return []
            finally:
                call.cancel()
            return chunks

    return asyncio.run(run())


def _token_blocks(chunks: list[common_pb2.KvEventBatch]) -> list[list[int]]:
    """The token ids of every block the chunks store."""
    return [list(b.token_ids) for c in chunks for e in c.events for b in e.stored.blocks]


def _served_prompt(kvmesh_up: UpProcess, model_dir: Path, system: str,
                   more_systems: tuple[str, ...] = ()) -> list[int]:
    """Serve a chat with ``system`` (then one per ``more_systems``) through the mesh;
    return the first prompt's token ids, as the gateway renders them."""
    client = openai.OpenAI(base_url=kvmesh_up.state["http"], api_key="x", max_retries=0)
    for content in (system, *more_systems):
        client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": content},
            {"role": "user", "content": "Hi"}])  # type: ignore[arg-type]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    return list(tok.encode(tok.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True),
                           add_special_tokens=False))


def test_a_subscriber_resumes_from_its_cursor_or_gets_what_the_worker_holds(
        kvmesh_up: UpProcess, model_dir: Path) -> None:
    """The worker follows its engine's events for its whole life: a fresh subscriber
    (a router that lost its view) first gets the blocks the engine holds as a
    snapshot, and one that broke off resumes from its cursor with the batches it
    missed — where the library's relay answered live batches only, and OUT_OF_RANGE to
    a cursor."""
    system = "Archive clerk notes, series 7731: " + " ".join(
        f"shelf {i} holds box {i * 7 % 101}." for i in range(40))
    # Two more prompts of their own: three batches on two workers, so one of them is
    # past its first (numbered 0) for the resume below.
    ids = _served_prompt(kvmesh_up, model_dir, system,
                         tuple(system.replace("7731", series) for series in ("8842", "9953")))
    first_block = ids[:32]

    holder = None
    deadline = time.monotonic() + 20
    while holder is None and time.monotonic() < deadline:
        for worker in kvmesh_up.state["workers"]:
            snapshot = _snapshot(worker["endpoint"])
            assert snapshot, f"{worker['endpoint']} sent no snapshot"
            assert all(c.HasField("snapshot") for c in snapshot)
            assert [c.snapshot.index for c in snapshot] == list(range(len(snapshot)))
            held = _token_blocks(snapshot)
            assert len(held) == snapshot[0].snapshot.blocks > 0
            if first_block in held:
                holder = worker["endpoint"]
                break
        else:
            time.sleep(0.2)
    assert holder is not None, "no worker's snapshot holds the prompt's first block"

    # Resuming (0 means "from the current state", so on a worker past its first batch).
    last: dict[str, int] = {}
    for w in kvmesh_up.state["workers"]:
        chunks = _snapshot(w["endpoint"])
        last[w["endpoint"]] = chunks[0].sequence_number if chunks else -1
    busiest = max(last, key=lambda endpoint: last[endpoint])
    seq = last[busiest]
    assert seq >= 1, last
    replayed = _subscribe(busiest, seq - 1, 2)
    assert [(b.HasField("snapshot"), b.sequence_number) for b in replayed] == [
        (False, seq - 1), (False, seq)]
    # Resumed after the last batch: live from there (a heartbeat while idle), no refusal.
    (live,) = _subscribe(busiest, seq + 1, 1, heartbeats=True)
    assert not live.HasField("snapshot") and live.sequence_number >= seq


def test_a_router_started_after_the_workers_served_knows_their_caches_at_once(
        kvmesh_up: UpProcess, model_dir: Path, tmp_path: Path) -> None:
    """A router that comes up next to a running fleet (a new replica; one restarted
    without its snapshot file) learns every block the workers hold from their
    snapshots, before any new request: it routes a cached prefix to its holder at once
    (with the library's live-only relay it knew nothing until blocks were stored again)."""
    system = "Ledger of the harbour master, volume 42: " + " ".join(
        f"pier {i} berths ship {i * 13 % 97}." for i in range(40))
    ids = _served_prompt(kvmesh_up, model_dir, system)
    held = {w["worker_id"]: _token_blocks(_snapshot(w["endpoint"]))
            for w in kvmesh_up.state["workers"]}
    holders = [wid for wid, blocks in held.items() if ids[:32] in blocks]
    assert len(holders) == 1, held.keys()

    ready = tmp_path / "late-router.ready"
    token = "late-router-token"  # this router alone takes it (the workers are asked
    # nothing that needs one: they are registered by the test, not by themselves)
    proc = spawn_module("kvmesh.router", ["--port", "0", "--policy", "kv_aware",
                                          "--ready-file", str(ready)], tmp_path / "late-router.log",
                        env={**os.environ, INTERNAL_TOKEN_ENV: token})
    try:
        router = wait_ready_file(ready, 60, proc, "router")["grpc"]

        async def register() -> None:
            async with grpc.aio.insecure_channel(router) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                for w in kvmesh_up.state["workers"]:
                    await stub.RegisterWorker(router_pb2.RegisterWorkerRequest(
                        worker=kvmesh_common_pb2.WorkerInfo(
                            worker_id=w["worker_id"], endpoint=w["endpoint"], model=MODEL,
                            block_size=32, self_registered=False)), timeout=10,
                        metadata=token_metadata(SecretStr(token)))

        asyncio.run(register())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            indexed = {s.worker.worker_id: s.indexed_blocks for s in list_workers(router)}
            if all(indexed.get(wid, 0) >= len(blocks) > 0 for wid, blocks in held.items()
                   if blocks):
                break
            time.sleep(0.2)
        assert all(indexed.get(wid, 0) >= len(blocks) for wid, blocks in held.items()), (
            indexed, {wid: len(b) for wid, b in held.items()})
        decision = _route(router, ids)
        assert decision.worker.worker_id == holders[0]
        assert decision.reason == "kv_aware:prefix"
        assert decision.expected_cached_tokens >= len(ids) // 32 * 32 - 32
    finally:
        terminate(proc, 10)

