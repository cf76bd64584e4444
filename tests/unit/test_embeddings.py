"""Embeddings: inputs, dimensions (Matryoshka), encodings, and the mesh's embedding workers."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from kvmesh.core.config import EngineConfig, WorkerConfig
from kvmesh.core.errors import InvalidRequestError
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.gateway.embeddings import (
    MAX_INPUTS,
    EmbeddingModelInfo,
    check_dimensions,
    check_input_length,
    check_token_ids,
    encode_embedding,
    shape_embedding,
    split_inputs,
)
from kvmesh.gateway.schemas import EmbeddingRequest
from kvmesh.launch.pools import plan_pools
from kvmesh.worker.engine_args import engine_kwargs

pytestmark = pytest.mark.unit


def worker_configs(config: MeshConfig, router: str, run_dir: Path) -> list[WorkerConfig]:
    return [w for p in plan_pools(config, router, run_dir) if not p.model.pooling
            for w in p.workers]


def embedding_worker_configs(config: MeshConfig, router: str, run_dir: Path
                             ) -> list[WorkerConfig]:
    return [w for p in plan_pools(config, router, run_dir) if p.model.pooling
            for w in p.workers]

MINILM_CONFIG = {"architectures": ["BertModel"], "hidden_size": 384, "model_type": "bert"}
MATRYOSHKA = {"hidden_size": 8, "matryoshka_dimensions": [2, 4, 8]}


def test_inputs_of_every_openai_shape() -> None:
    assert split_inputs("hi") == ["hi"]
    assert split_inputs(["a", "b"]) == ["a", "b"]
    assert split_inputs([101, 7592, 102]) == [[101, 7592, 102]]
    assert split_inputs([[101, 102], [101, 7, 102]]) == [[101, 102], [101, 7, 102]]
    for bad in ([], [[]], ["x"] * (MAX_INPUTS + 1)):
        with pytest.raises(InvalidRequestError) as err:
            split_inputs(bad)
        assert err.value.param == "input"


def test_request_schema_takes_the_openai_shapes_and_rejects_mixtures() -> None:
    for value in ("a", ["a", "b"], [1, 2], [[1], [2, 3]]):
        assert EmbeddingRequest(model="m", input=value).input == value
    with pytest.raises(ValueError):
        EmbeddingRequest(model="m", input=["a", 1])
    with pytest.raises(ValueError):
        EmbeddingRequest(model="m", input="a", encoding_format="int8")
    with pytest.raises(ValueError):
        EmbeddingRequest(model="m", input="a", dimensions=0)


def test_token_ids_outside_the_vocabulary_are_400() -> None:
    check_token_ids([0, 101, 30521], 30522)
    for bad in ([30522], [-1], [101, -87178291200]):
        with pytest.raises(InvalidRequestError, match=r"\[0, 30522\)") as err:
            check_token_ids(bad, 30522)
        assert err.value.param == "input"


def test_input_longer_than_context_is_rejected_like_vllm() -> None:
    check_input_length(256, 256)
    with pytest.raises(InvalidRequestError, match="maximum context length is 256") as err:
        check_input_length(257, 256)
    assert err.value.param == "input"


def test_dimensions_refused_for_a_model_without_matryoshka() -> None:
    info = EmbeddingModelInfo.from_config(MINILM_CONFIG)
    assert not info.is_matryoshka and info.hidden_size == 384
    check_dimensions(None, "all-MiniLM-L6-v2", info)
    with pytest.raises(InvalidRequestError, match="does not support Matryoshka") as err:
        check_dimensions(128, "all-MiniLM-L6-v2", info)
    assert err.value.param == "dimensions"


def test_dimensions_validated_for_matryoshka_models() -> None:
    info = EmbeddingModelInfo.from_config(MATRYOSHKA)
    assert info.is_matryoshka and info.matryoshka_dimensions == (2, 4, 8)
    check_dimensions(4, "m", info)
    with pytest.raises(InvalidRequestError, match=r"only supports Matryoshka dimensions"):
        check_dimensions(3, "m", info)
    with pytest.raises(InvalidRequestError, match=r"range \[1, 8\]"):
        check_dimensions(9, "m", info)
    # is_matryoshka without a list of sizes: any size up to the hidden size.
    check_dimensions(3, "m", EmbeddingModelInfo.from_config({"is_matryoshka": True}))


def test_dimensions_truncate_then_normalize_like_vllms_pooler() -> None:
    raw = np.array([3.0, 4.0, 12.0, 0.0], dtype=np.float32)
    normalized = raw / np.linalg.norm(raw)
    assert np.allclose(shape_embedding(normalized.tolist(), None, "m"), normalized)
    cut = shape_embedding(normalized.tolist(), 2, "m")
    assert np.allclose(cut, [0.6, 0.8])
    with pytest.raises(InvalidRequestError):
        shape_embedding(normalized.tolist(), 5, "m")


def test_base64_is_little_endian_float32() -> None:
    vector = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    assert encode_embedding(vector, "float") == [0.5, -1.25, 3.0]
    encoded = encode_embedding(vector, "base64")
    assert isinstance(encoded, str)
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == [0.5, -1.25, 3.0]


def test_mesh_serves_an_embedding_worker_by_default(tmp_path: Path) -> None:
    config = MeshConfig(
        workers=2, worker=WorkerConfig(engine=EngineConfig(enforce_eager=True, block_size=32))
    )
    chat = worker_configs(config, "r:1", tmp_path)
    emb = embedding_worker_configs(config, "r:1", tmp_path)
    assert len(chat) == 2 and len(emb) == 1
    engine = emb[0].engine
    assert (engine.model, engine.runner, engine.max_model_len) == (
        "embedded-embedding", "pooling", 256)
    assert engine.enforce_eager and not engine.enable_prefix_caching
    # Every actor fits in the machine's Ray CPUs.
    cpus = sum(c.num_cpus for c in chat + emb)
    assert cpus <= (__import__("os").cpu_count() or 1) + 1e-9
    kwargs = engine_kwargs(emb[0], Path("/m"), "all-MiniLM-L6-v2", "w")
    assert kwargs["runner"] == "pooling" and kwargs["enable_prefix_caching"] is False
    assert "runner" not in engine_kwargs(chat[0], Path("/m"), "s", "w")


def test_worker_configs_serialise_without_warnings(tmp_path: Path) -> None:
    """`kvmesh up` hands each worker its config serialised; a field holding a value of
    the wrong type (the role as the string 'both') made pydantic print a serializer
    warning at every start."""
    import warnings

    from kvmesh.core.security_config import REVEAL_SECRETS

    config = MeshConfig(workers=1, prefill=1, decode=1)
    configs = (worker_configs(config, "r:1", tmp_path)
               + embedding_worker_configs(config, "r:1", tmp_path))
    assert [c.role for c in configs] == ["both", "prefill", "decode", "both"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for worker in configs:
            dumped = worker.model_dump(mode="json", context=REVEAL_SECRETS)  # as the actor's
            assert WorkerConfig.model_validate(dumped) == worker


def test_embeddings_can_be_turned_off(tmp_path: Path) -> None:
    config = MeshConfig.model_validate({"embeddings": {"workers": 0}})
    assert embedding_worker_configs(config, "r:1", tmp_path) == []


def test_benchmarks_start_no_embedding_worker() -> None:
    from kvmesh.cli import bench_mesh_config, build_parser

    for argv in (["bench", "gateway", "--enforce-eager"], ["bench", "pd"]):
        args = build_parser().parse_args(argv)
        config = bench_mesh_config(args)
        assert config.embeddings.workers == 0
    gateway = bench_mesh_config(build_parser().parse_args(["bench", "gateway"]), workers=1)
    assert gateway.workers == 1 and gateway.gateway.port == 0
