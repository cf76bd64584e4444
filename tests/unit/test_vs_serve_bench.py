"""`kvmesh bench gateway --against vllm-serve`: the same engine settings on both sides,
vLLM's client with a fixed chat load, and the comparison it prints."""

from pathlib import Path

import pytest

from kvmesh.bench.vs_serve import ClientLoad, _role, client_argv, compare, serve_argv, serve_env
from kvmesh.core.mesh_config import MeshConfig

pytestmark = pytest.mark.unit


def config() -> MeshConfig:
    return MeshConfig.model_validate({"worker": {"engine": {
        "model": "/m", "block_size": 32, "enforce_eager": True, "max_num_seqs": 16,
        "max_model_len": 2048}}})


def test_vllm_server_gets_the_mesh_workers_engine_settings() -> None:
    argv = serve_argv(config(), Path("/m"), "smol", 8123)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(zip(argv[3::1], argv[4::1], strict=False))
    assert pairs["--block-size"] == "32" and pairs["--max-num-seqs"] == "16"
    assert pairs["--max-model-len"] == "2048" and pairs["--served-model-name"] == "smol"
    assert "--enforce-eager" in argv and pairs["--host"] == "127.0.0.1"
    env = serve_env(config())
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and "VLLM_CPU_OMP_THREADS_BIND" in env


def test_client_is_vllm_bench_chat_streaming_with_a_fixed_load() -> None:
    load = ClientLoad(num_prompts=10, concurrency=4, input_len=64, output_len=32, seed=7)
    argv = client_argv("http://127.0.0.1:1", "smol", Path("/m"), load, Path("/r/x.json"))
    text = " ".join(argv)
    for part in ("bench serve", "--backend openai-chat", "--endpoint /v1/chat/completions",
                 "--dataset-name random", "--random-input-len 64", "--random-output-len 32",
                 "--num-prompts 10", "--max-concurrency 4", "--ignore-eos", "--seed 7",
                 "--result-filename x.json"):
        assert part in text


def test_compare_takes_medians_per_side() -> None:
    runs = [{"side": s, "output_throughput": t, "median_ttft_ms": f, "median_tpot_ms": 1.0}
            for s, t, f in (("vllm-serve", 100, 200), ("mesh", 90, 230),
                            ("vllm-serve", 110, 220), ("mesh", 96, 240))]
    out = compare(runs)
    assert out["mesh_over_vllm_output_throughput"] == round(93 / 105, 3)
    assert out["mesh_minus_vllm_ttft_median_ms"] == 25.0


def test_processes_are_named_by_their_part() -> None:
    assert _role(["python", "-m", "kvmesh.gateway", "--config", "x"], "python") == "gateway"
    assert _role([], "VLLM::EngineCore") == "engine core"
    assert _role(["ray::WorkerActor.start"], "ray::WorkerActo") == "worker actor"
    assert _role(["python", "-m", "vllm.entrypoints.cli.main", "bench", "serve"], "py") == \
        "bench client"
