"""POST /v1/embeddings and Inference.Embed against `kvmesh up` (real vLLM, pooling runner).

The reference is all-MiniLM-L6-v2 computed here with transformers on the same weights,
the sentence-transformers way: mean pooling over the attention mask, then L2-normalize.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import openai
import pytest

from kvmesh.models.embedded import EMBEDDED_EMBEDDING_MODEL, prepare_embedded_embedding_model
from kvmesh.v1 import inference_pb2, inference_pb2_grpc

from .conftest import MODEL, UpProcess

pytestmark = pytest.mark.e2e
EMB = EMBEDDED_EMBEDDING_MODEL
TEXTS = [
    "The capital of France is Paris.",
    "A quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors; similar texts map to nearby vectors.",
]


@pytest.fixture(scope="module")
def client(kvmesh_up: UpProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=kvmesh_up.state["http"], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():  # type: ignore[no-untyped-def]
    """(tokenizer, texts -> normalized mean-pooled vectors) on the packaged weights."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = str(prepare_embedded_embedding_model())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return tokenizer, embed


def _cosines(got: list[list[float]], want: np.ndarray) -> list[float]:
    g = np.asarray(got, dtype=np.float64)
    w = want.astype(np.float64)
    return list((g * w).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(w, axis=1))


def test_models_lists_chat_and_embedding_model(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list().data) == sorted([MODEL, EMB])


def test_batch_of_texts_matches_reference(client: openai.OpenAI, reference) -> None:  # type: ignore[no-untyped-def]
    tokenizer, embed = reference
    # The SDK asks for base64 by default and decodes it with numpy.
    reply = client.embeddings.create(model=EMB, input=TEXTS)
    assert reply.model == EMB and reply.object == "list"
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert all(len(d.embedding) == 384 for d in reply.data)
    assert min(_cosines([d.embedding for d in reply.data], embed(TEXTS))) > 0.9999
    n_tokens = sum(len(tokenizer.encode(t)) for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == n_tokens
    # Different texts really are different vectors.
    assert max(_cosines([reply.data[0].embedding], embed([TEXTS[1]]))) < 0.9


def test_float_and_base64_agree(client: openai.OpenAI, kvmesh_up: UpProcess) -> None:
    as_float = client.embeddings.create(model=EMB, input=TEXTS[0], encoding_format="float")
    raw = httpx.post(kvmesh_up.state["http"] + "/embeddings",
                     json={"model": EMB, "input": TEXTS[0], "encoding_format": "base64"})
    assert raw.status_code == 200
    body = raw.json()
    assert isinstance(body["data"][0]["embedding"], str)
    assert body["usage"]["completion_tokens"] == 0
    decoded = np.frombuffer(__import__("base64").b64decode(body["data"][0]["embedding"]), "<f4")
    assert np.allclose(decoded, as_float.data[0].embedding, atol=1e-6)


def test_token_arrays(client: openai.OpenAI, reference) -> None:  # type: ignore[no-untyped-def]
    tokenizer, embed = reference
    ids = [tokenizer.encode(t) for t in TEXTS[:2]]
    one = client.embeddings.create(model=EMB, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=EMB, input=ids, encoding_format="float")
    assert one.usage.prompt_tokens == len(ids[0])
    assert min(_cosines([one.data[0].embedding], embed(TEXTS[:1]))) > 0.9999
    assert min(_cosines([d.embedding for d in many.data], embed(TEXTS[:2]))) > 0.9999


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMB, input="x", dimensions=128)
    assert err.value.body["param"] == "dimensions"
    assert "does not support Matryoshka" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMB, input="word " * 300)
    assert err.value.body["param"] == "input"
    assert "maximum context length is 256" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMB, input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    # The chat model is no pooling model: the worker's own refusal, as a 400.
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="x")
    # ... and the embedding model does not generate.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMB, prompt="x", max_tokens=2)


def test_grpc_embed(kvmesh_up: UpProcess, client: openai.OpenAI) -> None:
    http = client.embeddings.create(model=EMB, input=TEXTS[:2], encoding_format="float")

    async def run() -> inference_pb2.EmbedResponse:
        async with grpc.aio.insecure_channel(kvmesh_up.state["grpc"]) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            reply = await stub.Embed(inference_pb2.EmbedRequest(
                model=EMB, request_id="emb-1",
                inputs=[inference_pb2.EmbedInput(text=t) for t in TEXTS[:2]]), timeout=60)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Embed(inference_pb2.EmbedRequest(
                    model=EMB, inputs=[inference_pb2.EmbedInput(text="x")], dimensions=8),
                    timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return reply

    reply = asyncio.run(run())
    assert reply.id == "emb-1" and [e.index for e in reply.data] == [0, 1]
    assert reply.usage.prompt_tokens == http.usage.prompt_tokens
    for got, want in zip(reply.data, http.data, strict=True):
        assert np.allclose(list(got.values), want.embedding, atol=1e-6)
