"""Multi-LoRA plumbing on real processes (router, 2 workers, gateway) with fake engines.

A fake worker with an adapter echoes the prompt backwards (``FakeLoraEngine``), so every
answer shows whether the adapter reached the engine. Real vLLM: tests/e2e/test_lora.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc
from transformers import AutoTokenizer

from kvmesh.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.prom import Scrape

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "one two three four five"


def make_adapter(folder: Path, rank: int = 8) -> Path:
    """What the fake engine reads of an adapter: its adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"r": rank, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def lora_mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh("kvm-lora-") as mesh:
        adapters = {name: str(make_adapter(mesh.dir / "adapters" / name))
                    for name in ("sql", "poet", "chef")}
        config = mesh.dir / "worker.yaml"
        config.write_text(json.dumps({"engine": {"lora": {
            "max_loras": 1, "max_lora_rank": 8,
            "adapters": {"sql": adapters["sql"], "poet": adapters["poet"]}}}}))
        mesh.router = start_router(mesh, "router", "--policy", "kv_aware")
        mesh.workers = [mesh.start_worker(w, "--config", str(config)) for w in ("w0", "w1")]
        mesh.start_gateway()
        yield mesh


@pytest.fixture(scope="module")
def lora_client(lora_mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_mesh.http, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def prompt_ids(model_dir: Path) -> list[int]:
    return list(AutoTokenizer.from_pretrained(str(model_dir)).encode(PROMPT))


def adapters_on(mesh: Mesh) -> dict[str, dict[str, worker_pb2.LoraAdapter]]:
    """Each worker's adapters as its LoraAdapters service reports them."""

    async def ask(endpoint: str) -> dict[str, worker_pb2.LoraAdapter]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            reply = await worker_pb2_grpc.LoraAdaptersStub(channel).ListLoraAdapters(
                worker_pb2.ListLoraAdaptersRequest(), timeout=5)
        return {a.name: a for a in reply.adapters}

    return {w["worker_id"]: asyncio.run(ask(w["endpoint"])) for w in mesh.workers}


def requests_for(mesh: Mesh, adapter: str) -> dict[str, int]:
    return {wid: (a[adapter].requests if adapter in a else 0)
            for wid, a in adapters_on(mesh).items()}


def complete(client: openai.OpenAI, model: str) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=40)
    return str(reply.choices[0].text)


def post(mesh: Mesh, path: str, body: dict) -> httpx.Response:
    return httpx.post(mesh.http.removesuffix("/v1") + path, json=body, timeout=30)


def test_models_list_adapters_with_their_parent(lora_client: openai.OpenAI) -> None:
    cards = {m.id: m for m in lora_client.models.list().data}
    assert set(cards) == {MODEL, "poet", "sql"}
    assert cards["sql"].model_extra["parent"] == MODEL
    assert cards["poet"].model_extra["parent"] == MODEL
    assert cards[MODEL].model_extra.get("parent") is None
    assert lora_client.models.retrieve(f"{MODEL}:sql").model_extra["parent"] == MODEL


def test_adapter_by_both_names_reaches_the_engine(lora_client: openai.OpenAI,
                                                  model_dir: Path, prompt_ids: list[int]
                                                  ) -> None:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert complete(lora_client, MODEL) == PROMPT
    backwards = tok.decode(prompt_ids[::-1])
    assert complete(lora_client, "sql") == backwards
    assert complete(lora_client, f"{MODEL}:sql") == backwards
    chat = lora_client.chat.completions.create(
        model="poet", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.model == "poet"  # answered under the name asked for, as vLLM does


def test_grpc_door_serves_adapters(lora_mesh: Mesh, model_dir: Path,
                                   prompt_ids: list[int]) -> None:
    async def run() -> tuple[str, list[tuple[str, str]]]:
        async with grpc.aio.insecure_channel(lora_mesh.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            models = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            text = ""
            async for r in stub.Complete(inference_pb2.CompletionRequest(
                    model=f"{MODEL}:sql", text=PROMPT,
                    sampling=inference_pb2.SamplingOptions(max_tokens=40)), timeout=10):
                text += "".join(c.text for c in r.choices)
            return text, [(m.id, m.parent) for m in models.models]

    text, models = asyncio.run(run())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert text == tok.decode(prompt_ids[::-1])
    assert ("sql", MODEL) in models and (MODEL, "") in models


def test_unknown_adapter_is_a_404(lora_client: openai.OpenAI) -> None:
    for name in ("nope", f"{MODEL}:nope"):
        with pytest.raises(openai.NotFoundError) as err:
            complete(lora_client, name)
        assert "nope" in err.value.message


def test_follow_up_requests_stick_to_the_worker_that_loaded_the_adapter(
        lora_mesh: Mesh, lora_client: openai.OpenAI) -> None:
    before = requests_for(lora_mesh, "poet")
    for _ in range(6):
        complete(lora_client, "poet")
    after = requests_for(lora_mesh, "poet")
    added = sorted(after[w] - before[w] for w in after)
    assert added == [0, 6], after
    loaded = {w: a["poet"].loaded for w, a in adapters_on(lora_mesh).items()}
    holder = max(after, key=lambda w: after[w] - before[w])
    assert loaded[holder]
    assert Scrape.of(lora_mesh.router_metrics).total(
        "kvmesh_router_adapter_routes_total", adapter_state="loaded") >= 5


def test_load_and_unload_at_run_time(lora_mesh: Mesh, lora_client: openai.OpenAI) -> None:
    chef = str(lora_mesh.dir / "adapters" / "chef")
    reply = post(lora_mesh, "/v1/load_lora_adapter", {"lora_name": "chef", "lora_path": chef})
    assert reply.status_code == 200 and "chef" in reply.text
    assert "chef" in {m.id for m in lora_client.models.list().data}
    assert complete(lora_client, "chef") != PROMPT
    again = post(lora_mesh, "/v1/load_lora_adapter", {"lora_name": "chef", "lora_path": chef})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    # Every worker serves it (a load fans out to all of the model's LoRA workers).
    assert all("chef" in a for a in adapters_on(lora_mesh).values())

    gone = post(lora_mesh, "/v1/unload_lora_adapter", {"lora_name": "chef"})
    assert gone.status_code == 200
    assert "chef" not in {m.id for m in lora_client.models.list().data}
    assert all("chef" not in a for a in adapters_on(lora_mesh).values())
    with pytest.raises(openai.NotFoundError):
        complete(lora_client, "chef")
    missing = post(lora_mesh, "/v1/unload_lora_adapter", {"lora_name": "chef"})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


def test_a_bad_adapter_fails_clearly_and_the_worker_stays_healthy(
        lora_mesh: Mesh, lora_client: openai.OpenAI) -> None:
    nowhere = post(lora_mesh, "/v1/load_lora_adapter",
                   {"lora_name": "ghost", "lora_path": str(lora_mesh.dir / "no-such")})
    assert nowhere.status_code == 404
    assert "ghost" in nowhere.json()["error"]["message"]
    broken_dir = lora_mesh.dir / "adapters" / "broken"
    broken_dir.mkdir()
    (broken_dir / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # no rank
    broken = post(lora_mesh, "/v1/load_lora_adapter",
                  {"lora_name": "broken", "lora_path": str(broken_dir)})
    assert broken.status_code == 400
    error = broken.json()["error"]
    assert "broken" in error["message"] and "failed to load" in error["message"]
    assert error["param"] == "lora_path"
    models = {m.id for m in lora_client.models.list().data}
    assert "ghost" not in models and "broken" not in models
    assert all("broken" not in a for a in adapters_on(lora_mesh).values())

    async def healthy(endpoint: str) -> bool:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            reply = await vllm_engine_pb2_grpc.VllmEngineStub(channel).HealthCheck(
                vllm_engine_pb2.HealthCheckRequest(), timeout=5)
        return bool(reply.healthy)

    assert all(asyncio.run(healthy(w["endpoint"])) for w in lora_mesh.workers)
    assert complete(lora_client, MODEL) == PROMPT and complete(lora_client, "sql") != PROMPT


def test_three_adapters_over_two_workers_with_one_slot_each(
        lora_mesh: Mesh, lora_client: openai.OpenAI) -> None:
    chef = str(lora_mesh.dir / "adapters" / "chef")
    assert post(lora_mesh, "/v1/load_lora_adapter",
                {"lora_name": "chef", "lora_path": chef}).status_code == 200
    try:
        names = ["sql", "poet", "chef"] * 4
        for name in names:
            assert complete(lora_client, name) != PROMPT
        # One slot per worker: never more than one adapter loaded on a worker.
        loaded = [sum(a.loaded for a in w.values()) for w in adapters_on(lora_mesh).values()]
        assert loaded == [1, 1]
    finally:
        post(lora_mesh, "/v1/unload_lora_adapter", {"lora_name": "chef"})


def test_a_worker_that_joins_later_gets_the_adapters_loaded_at_run_time(
        model_dir: Path) -> None:
    """A scale-up (or a restarted worker) serves what its model's workers serve, the
    adapters loaded at run time before it came included."""
    with running_mesh("kvm-lora-join-") as mesh:
        chef = str(make_adapter(mesh.dir / "adapters" / "chef"))
        config = mesh.dir / "worker.yaml"
        config.write_text(json.dumps({"engine": {"lora": {
            "max_loras": 1, "max_lora_rank": 8,
            "adapters": {"sql": str(make_adapter(mesh.dir / "adapters" / "sql"))}}}}))
        mesh.router = start_router(mesh, "router")
        mesh.workers = [mesh.start_worker("w0", "--config", str(config))]
        mesh.start_gateway()
        loaded = post(mesh, "/v1/load_lora_adapter", {"lora_name": "chef", "lora_path": chef})
        assert loaded.status_code == 200, loaded.text
        mesh.workers.append(mesh.start_worker("w1", "--config", str(config)))
        for _ in range(200):
            late = adapters_on(mesh)["w1"]
            if "chef" in late:
                break
            time.sleep(0.1)
        assert "chef" in late and late["chef"].source == chef, late
        assert set(late) == {"sql", "chef"}
        client = openai.OpenAI(base_url=mesh.http, api_key="unused", max_retries=0)
        for _ in range(6):
            assert complete(client, "chef") != PROMPT
