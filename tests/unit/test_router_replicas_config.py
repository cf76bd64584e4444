"""`kvmesh up --routers N` and a gateway's router list: the settings each process gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.core.config import GatewayConfig, RouterConfig, load_settings
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.launch.services import router_configs
from kvmesh.launch.state import mesh_pids

pytestmark = pytest.mark.unit


def test_one_router_snapshots_into_the_run_dir_by_default(tmp_path: Path) -> None:
    [router] = router_configs(MeshConfig(), tmp_path)
    assert router.snapshot_path == tmp_path / "router-snapshot.npz"
    assert router.port == 0 and router.metrics_port == 0


def test_replicas_get_free_ports_and_snapshots_of_their_own(tmp_path: Path) -> None:
    config = MeshConfig(routers=3, router=RouterConfig(port=6000, policy="round_robin",
                                                       snapshot_path=tmp_path / "idx.npz"))
    routers = router_configs(config, tmp_path)
    assert [r.port for r in routers] == [6000, 0, 0]
    assert [r.snapshot_path for r in routers] == [
        tmp_path / "idx-0.npz", tmp_path / "idx-1.npz", tmp_path / "idx-2.npz"]
    assert {r.policy for r in routers} == {"round_robin"}


def test_routers_flag_and_state_pids(tmp_path: Path) -> None:
    assert load_settings(MeshConfig, None, routers=2).routers == 2
    with pytest.raises(ValueError):
        MeshConfig(routers=0)
    state = {"pid": 1, "pids": {"router": 2, "routers": [2, 3], "gateway": 4, "workers": [5]}}
    assert mesh_pids(state) == [1, 2, 3, -1, 4, 5]
    assert mesh_pids({"pid": 1, "pids": {"router": 2}})[:2] == [1, 2]


def test_gateway_router_addresses() -> None:
    assert GatewayConfig().router_addresses() == ["127.0.0.1:50051"]
    assert GatewayConfig(router="a:1, b:2").router_addresses() == ["a:1", "b:2"]
    assert GatewayConfig(router="x:9", routers=["a:1", "b:2"]).router_addresses() == [
        "a:1", "b:2"]
