"""Chat with images through the mesh: a tiny Idefics3 VLM with random weights
(vLLM ``load_format=dummy``) on a real vLLM worker.

Random weights make the text meaningless, so these tests check the data path:
the gateway's processor output (expanded prompt, pixels) reaches the engine, the
usage counts image tokens, and vLLM keys its KV cache by the image it received.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from kvmesh.models.tiny_vlm import IMAGE_SEQ_LEN, TINY_VLM, prepare_tiny_vlm

pytestmark = pytest.mark.e2e


def png(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def data_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(seed)).decode()


class VlmMesh:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.media = work / "media"
        self.media.mkdir()
        self.procs: list[Any] = []
        router = self._start("router", "kvmesh.router",
                             ["--port", "0", "--metrics-port", "0"])["grpc"]
        env = {**os.environ, "KVMESH_WORKER_CPU_BIND": "0-1"}
        self._start("worker", "kvmesh.worker",
                    ["--no-ray", "--model", str(prepare_tiny_vlm()), "--load-format", "dummy",
                     "--router", router, "--port", "0", "--enforce-eager", "--block-size", "32",
                     "--max-model-len", "2048", "--run-dir", str(work)], env, timeout=600)
        env = {**os.environ, "KVMESH_GATEWAY_ALLOWED_LOCAL_MEDIA_PATH": str(self.media)}
        gateway = self._start("gateway", "kvmesh.gateway",
                              ["--router", router, "--port", "0", "--grpc-port", "0"], env)
        self.http = gateway["http"]
        self.grpc = gateway["grpc"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the gateway has the model's processor
            health = httpx.get(self.http.removesuffix("/v1") + "/health", timeout=5)
            if health.status_code == 200 and TINY_VLM in health.json()["models"]:
                break
            time.sleep(0.2)

    def _start(self, name: str, module: str, args: list[str],
               env: dict[str, str] | None = None, timeout: float = 60) -> dict[str, Any]:
        ready = self.work / f"{name}.ready"
        proc = spawn_module(module, [*args, "--ready-file", str(ready)],
                            self.work / f"{name}.log", env=env)
        self.procs.append(proc)
        return wait_ready_file(ready, timeout, proc, name)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}"
                         for p in sorted(self.work.glob("*.log")))


@pytest.fixture(scope="module")
def vlm() -> Iterator[VlmMesh]:
    with tempfile.TemporaryDirectory(prefix="kvm-vlm-") as d:
        mesh = None
        try:
            mesh = VlmMesh(Path(d))
            yield mesh
        except BaseException:
            print(mesh.logs() if mesh else "(mesh not started)")
            raise
        finally:
            for proc in reversed(mesh.procs if mesh else []):
                terminate(proc, 60)


@pytest.fixture(scope="module")
def client(vlm: VlmMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=vlm.http, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def processor():  # type: ignore[no-untyped-def]
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(prepare_tiny_vlm()))


def ask(client: openai.OpenAI, content: list[dict[str, Any]], max_tokens: int = 3) -> Any:
    return client.chat.completions.create(
        model=TINY_VLM, messages=[{"role": "user", "content": content}],  # type: ignore[misc]
        max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})


def test_image_tokens_are_counted_and_the_model_answers(
    client: openai.OpenAI, processor: Any
) -> None:
    text = [{"type": "text", "text": "What is in this picture?"}]
    reply = ask(client, [image_part(data_url(1)), *text])
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    # The prompt the engine ran is the processor's expansion: one tile of image tokens
    # framed by <fake_token_around_image><global-img> ... <fake_token_around_image>.
    plain = ask(client, text)
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens + IMAGE_SEQ_LEN + 3
    from PIL import Image

    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, *text]}], add_generation_prompt=True)
    expected = processor(text=[rendered], images=[[Image.open(io.BytesIO(png(1)))]],
                         add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(expected["input_ids"][0])
    two = ask(client, [image_part(data_url(1)), image_part(data_url(2)), *text])
    assert two.usage.prompt_tokens == plain.usage.prompt_tokens + 2 * (IMAGE_SEQ_LEN + 3)


def test_engine_keys_its_kv_cache_by_the_image_it_received(client: openai.OpenAI) -> None:
    # Same token ids, different pixels: vLLM's prefix cache hashes the image into the
    # blocks, so only the same image reuses them. The image sits in the first block.
    text = [{"type": "text", "text": "Describe the picture in detail. " * 12}]
    first = ask(client, [image_part(data_url(11)), *text], max_tokens=1)
    same = ask(client, [image_part(data_url(11)), *text], max_tokens=1)
    other = ask(client, [image_part(data_url(12)), *text], max_tokens=1)
    assert first.usage.prompt_tokens == same.usage.prompt_tokens == other.usage.prompt_tokens
    assert first.usage.prompt_tokens > 64
    assert same.usage.prompt_tokens_details.cached_tokens >= 64
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_local_files_under_the_allowed_directory(vlm: VlmMesh, client: openai.OpenAI) -> None:
    (vlm.media / "cat.png").write_bytes(png(3))
    text = {"type": "text", "text": "And what is in this one? " * 6}
    from_file = ask(client, [image_part(f"file://{vlm.media}/cat.png"), text], max_tokens=1)
    from_data = ask(client, [image_part(data_url(3)), text], max_tokens=1)
    assert from_file.usage.prompt_tokens == from_data.usage.prompt_tokens
    # The same pixels: the second request reuses the first one's blocks.
    assert from_data.usage.prompt_tokens_details.cached_tokens >= 32
    (vlm.work / "outside.png").write_bytes(png(4))
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [image_part(f"file://{vlm.work}/outside.png"), text])
    assert "outside the allowed directory" in err.value.body["message"]


def test_bad_images_are_400(client: openai.OpenAI) -> None:
    text = {"type": "text", "text": "?"}
    for url, message in (("https://example.com/cat.png", "does not fetch images"),
                         ("data:image/png;base64,bm90IGFuIGltYWdl", "cannot decode image")):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, [image_part(url), text])
        assert message in err.value.body["message"]
        assert err.value.body["param"] == "messages"


def test_streaming_with_an_image(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=TINY_VLM, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [image_part(data_url(5)),  # type: ignore[list-item]
                                               {"type": "text", "text": "Hi"}]}],
        max_tokens=4, temperature=0, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens > IMAGE_SEQ_LEN


def test_grpc_chat_with_an_image(vlm: VlmMesh, client: openai.OpenAI) -> None:
    import asyncio

    import grpc

    from kvmesh.v1 import inference_pb2, inference_pb2_grpc

    text = "What is in this picture? " * 4
    http = ask(client, [image_part(data_url(21)), {"type": "text", "text": text}], 2)

    async def run() -> list[inference_pb2.GenerationResponse]:
        async with grpc.aio.insecure_channel(vlm.grpc) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            message = inference_pb2.ChatMessage(role="user", parts=[
                inference_pb2.ContentPart(image_url=data_url(21)),
                inference_pb2.ContentPart(text=text)])
            return [r async for r in stub.Chat(inference_pb2.ChatRequest(
                model=TINY_VLM, messages=[message],
                sampling=inference_pb2.SamplingOptions(max_tokens=2, temperature=0)),
                timeout=120)]

    replies = asyncio.run(run())
    usage = replies[-1].usage
    assert usage.prompt_tokens == http.usage.prompt_tokens
    assert usage.cached_tokens >= 32  # the HTTP request's blocks, same image
