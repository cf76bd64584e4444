"""`kvmesh up --config examples/multi-model.yaml` on real vLLM (CPU): two generative
models (SmolLM2 under two ids, different engine settings and policies) plus embeddings,
all answering through one gateway that routes by model id; removing one while the mesh
runs, the gateway's /v1/models follows."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kvmesh.models.embedded import EMBEDDED_EMBEDDING_MODEL

from .conftest import UpProcess

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multi-model.yaml"
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def mesh(model_dir: Path) -> Iterator[UpProcess]:
    with tempfile.TemporaryDirectory(prefix="kvm-mm-") as d:
        up = UpProcess(Path(d), topology=("--config", str(EXAMPLE)))
        try:
            yield up
        finally:
            up.interrupt()


@pytest.fixture(scope="module")
def client(mesh: UpProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.state["http"], api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, model: str, content: str = QUESTION,
           max_tokens: int = 24) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=max_tokens)


def test_both_models_and_embeddings_are_listed_with_their_settings(
        client: openai.OpenAI, mesh: UpProcess) -> None:
    cards = {m.id: m.model_extra["max_model_len"] for m in client.models.list().data}
    assert cards == {"smol-chat": 4096, "smol-short": 1024, EMBEDDED_EMBEDDING_MODEL: 256}
    assert [m["model_id"] for m in mesh.state["models"]] == [
        "smol-chat", "smol-short", EMBEDDED_EMBEDDING_MODEL]


def test_each_model_answers_on_its_own_worker(client: openai.OpenAI, mesh: UpProcess) -> None:
    chat, short = greedy(client, "smol-chat"), greedy(client, "smol-short")
    assert (chat.model, short.model) == ("smol-chat", "smol-short")
    # The same weights, dtype and compile mode: the same greedy answer from each pool.
    assert "Paris" in str(chat.choices[0].message.content)
    assert chat.choices[0].message.content == short.choices[0].message.content
    status = subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", "status", "--json", "--state-file",
         str(mesh.state_file)], capture_output=True, text=True, timeout=60, check=True)
    workers = json.loads(status.stdout)["workers"]
    by_model = {w["worker"]["model"]: w for w in workers}
    assert by_model["smol-chat"]["worker"]["routing_policy"] == "kv_aware"
    assert by_model["smol-short"]["worker"]["routing_policy"] == "round_robin"
    assert by_model["smol-chat"]["worker"]["worker_id"] != by_model["smol-short"]["worker"][
        "worker_id"]
    # Each pool's Ray actor holds the fraction of a CPU the example gives it.
    assert [w["resources"] for w in mesh.state["workers"]] == [{"CPU": 0.5}, {"CPU": 0.5}]


def test_a_model_s_engine_settings_are_its_own(client: openai.OpenAI) -> None:
    long_prompt = "word " * 1500  # over smol-short's 1024-token context, within smol-chat's
    assert greedy(client, "smol-chat", long_prompt, max_tokens=2).usage.prompt_tokens > 1024
    with pytest.raises(openai.BadRequestError) as exc:
        greedy(client, "smol-short", long_prompt, max_tokens=2)
    assert "1024" in str(exc.value)


def test_embeddings_answer_next_to_the_chat_models(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=EMBEDDED_EMBEDDING_MODEL, input=["Paris"])
    assert reply.model == EMBEDDED_EMBEDDING_MODEL and len(reply.data[0].embedding) == 384


def test_removing_a_model_while_running(client: openai.OpenAI, mesh: UpProcess) -> None:
    removed = subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", "models", "remove", "smol-short", "--json",
         "--state-file", str(mesh.state_file)], capture_output=True, text=True, timeout=180)
    assert removed.returncode == 0, removed.stderr
    unlisted_after_s = json.loads(removed.stdout)["unlisted_after_s"]
    print(f"/v1/models dropped smol-short {unlisted_after_s:.3f}s after the router")
    assert unlisted_after_s < 2.0
    assert "smol-short" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        greedy(client, "smol-short")
    started = time.monotonic()
    assert greedy(client, "smol-chat").model == "smol-chat"
    assert time.monotonic() - started < 30
