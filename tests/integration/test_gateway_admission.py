"""Embeddings go through the same admission as generations (HTTP and gRPC): with the
gateway's one request slot held by a generation, an embedding request is refused with 429
(RESOURCE_EXHAUSTED over gRPC) and Retry-After; once the slot is free it is admitted."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from kvmesh.v1 import inference_pb2, inference_pb2_grpc

from .conftest import Mesh, running_mesh, start_router

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def mesh(model_dir: Path) -> Iterator[Mesh]:
    with running_mesh() as mesh:
        mesh.router = start_router(mesh)
        mesh.workers = [mesh.start_worker("w0")]
        mesh.start_gateway("--max-concurrent-requests", "1", timeout_s=180)
        yield mesh


@contextlib.contextmanager
def held_slot(mesh: Mesh) -> Iterator[None]:
    """A chat request holding the gateway's only slot until the block ends: the fake
    engine echoes the prompt at a token per 5 ms, so ~600 tokens take seconds."""
    body = {"model": MODEL, "max_tokens": 700,
            "messages": [{"role": "user", "content": "mesh " * 600}]}
    holder = threading.Thread(target=lambda: httpx.post(
        mesh.http + "/chat/completions", json=body, timeout=120))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while in_flight(mesh) < 1:  # admitted and generating
            assert time.monotonic() < deadline, "the holding request never started"
            time.sleep(0.01)
        yield
    finally:
        holder.join(120)


def in_flight(mesh: Mesh) -> float:
    text = httpx.get(mesh.http.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvmesh_gateway_in_flight_streams{"))


def embed_http(mesh: Mesh) -> httpx.Response:
    return httpx.post(mesh.http + "/embeddings", json={"model": MODEL, "input": ["a b c"]},
                      timeout=30)


def embed_grpc(mesh: Mesh) -> grpc.StatusCode:
    with grpc.insecure_channel(mesh.grpc) as channel:
        try:
            inference_pb2_grpc.InferenceStub(channel).Embed(inference_pb2.EmbedRequest(
                model=MODEL, inputs=[inference_pb2.EmbedInput(text="a b c")]), timeout=30)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_embeddings_wait_for_a_slot_like_generations(mesh: Mesh) -> None:
    with held_slot(mesh):
        refused = embed_http(mesh)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1
        assert embed_grpc(mesh) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The request ended: its slot is free, and the embedding requests are admitted (the
    # fake engine then answers them however it answers embeddings, but not with 429).
    assert embed_http(mesh).status_code != 429
    assert embed_grpc(mesh) != grpc.StatusCode.RESOURCE_EXHAUSTED
