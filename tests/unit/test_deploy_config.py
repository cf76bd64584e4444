from pathlib import Path

import pytest

from kvmesh.core.config import MeshConfig, load_settings

pytestmark = pytest.mark.unit


def test_example_mesh_config_loads() -> None:
    path = Path(__file__).parents[2] / "deploy" / "kvmesh.yaml"
    cfg = load_settings(MeshConfig, path)
    assert cfg.workers == 2 and cfg.worker.engine.block_size == 32
    assert cfg.router.policy == "kv_aware"
    assert cfg.embeddings.workers == 1 and cfg.embeddings.model == "embedded-embedding"
