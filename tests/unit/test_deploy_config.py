from pathlib import Path

import pytest

from kvmesh.core.config import load_settings
from kvmesh.core.mesh_config import MeshConfig

pytestmark = pytest.mark.unit


def test_example_mesh_config_loads() -> None:
    path = Path(__file__).parents[2] / "deploy" / "kvmesh.yaml"
    cfg = load_settings(MeshConfig, path)
    assert cfg.workers == 2 and cfg.worker.engine.block_size == 32
    assert cfg.router.policy == "kv_aware"
    assert cfg.embeddings.workers == 1 and cfg.embeddings.model == "embedded-embedding"


def test_example_ray_mesh_config_loads_and_places_workers_as_one_group() -> None:
    from kvmesh.launch.placement import bundle

    path = Path(__file__).parents[2] / "deploy" / "ray-mesh.yaml"
    cfg = load_settings(MeshConfig, path)
    assert cfg.placement == "PACK" and cfg.workers == 2
    assert bundle(cfg.worker) == {"CPU": 2.0, "kvmesh_pool": 1.0}


def test_placement_must_be_a_ray_strategy() -> None:
    with pytest.raises(ValueError, match="placement"):
        MeshConfig.model_validate({"placement": "pack_tightly"})
