"""`kvmesh up --model s3://...`: the embedded SmolLM2 uploaded to moto's S3 server on
127.0.0.1, fetched once into the node cache, served by real vLLM."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import openai
import pytest

from kvmesh.models.embedded import is_prepared
from tests.object_stores import MotoS3

from .conftest import UpProcess

pytestmark = pytest.mark.e2e


def test_up_serves_a_model_from_s3(model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kvm-s3up-") as d:
        workdir = Path(d)
        s3 = MotoS3(workdir)
        try:
            s3.upload(model_dir, "models", "smollm2")
            cache = workdir / "cache"
            env = {**os.environ, **s3.env, "KVMESH_MODEL_CACHE": str(cache)}
            up = UpProcess(workdir, ("--workers", "1"),
                           ("--no-embeddings", "--model", "s3://models/smollm2"), env)
            try:
                assert [w["model"] for w in up.state["workers"]] == ["smollm2"]
                client = openai.OpenAI(base_url=up.state["http"], api_key="unused",
                                       max_retries=0)
                reply = client.chat.completions.create(
                    model="smollm2", max_tokens=30, temperature=0,
                    messages=[{"role": "user", "content":
                               "What is the capital of France? Answer in one sentence."}])
                assert "Paris" in reply.choices[0].message.content
            finally:
                assert up.interrupt() == 0
            [entry] = [p for p in cache.iterdir() if p.name.startswith("s3--models--smollm2-")
                       and p.is_dir()]
            assert is_prepared(entry) and (entry / "model.safetensors").stat().st_size == (
                model_dir / "model.safetensors").stat().st_size
        finally:
            s3.stop()
