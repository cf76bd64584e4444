"""`python -m kvmesh.router --decision-log FILE` on real processes (fake engines): each
kv_aware decision is logged under the id the client sees on its completion, with the
candidates' views, so a routing run can be explained afterwards."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from kvmesh.router import decision_log
from tests.waiting import eventually

from .conftest import running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


def test_each_decision_is_logged_under_the_completions_id(model_dir: Path) -> None:
    with running_mesh() as mesh:
        log = mesh.dir / "decisions.jsonl"
        mesh.router = start_router(mesh, "router", "--decision-log", str(log),
                                   yaml="policy: kv_aware\n")
        mesh.workers = [mesh.start_worker("w0"), mesh.start_worker("w1")]
        mesh.start_gateway()
        client = openai.OpenAI(base_url=mesh.http, api_key="unused", max_retries=0)
        prompt = "The mesh routes by prefix. " * 40
        ids = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=4).id
               for _ in range(3)]
        assert eventually(lambda: set(ids) <= set(decision_log.read(log)), True, 10)
        logged = decision_log.read(log)
        entries = [logged[i] for i in ids]
        assert all(sorted(e["workers"]) == ["w0", "w1"] for e in entries)
        # The fake engine publishes no KV events and each request had finished before the
        # next: nothing counted as cached anywhere, both near-equal or priced apart.
        for e in entries:
            assert e["view"] == e["confirmed"] == [0, 0]
            assert e["chosen"] in e["near"] and e["prompt_tokens"] > 32
            assert set(e["terms"]) == {"0", "1"}
