"""The edge's settings, its command line, and the bootstrap shipped in deploy/envoy/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kvmesh.core.config import EdgeServiceConfig, load_settings
from kvmesh.edge.__main__ import _gateway
from kvmesh.edge.envoy import bootstrap

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_bootstrap_is_the_one_the_control_plane_writes() -> None:
    shipped = yaml.safe_load((ROOT / "deploy/envoy/bootstrap.yaml").read_text())
    config = EdgeServiceConfig()
    assert shipped == bootstrap(f"{config.host}:{config.port}", config.admin_port)
    # Envoy is told where the control plane is, and nothing it serves.
    assert set(shipped["dynamic_resources"]) == {"ads_config", "lds_config", "cds_config"}
    assert [c["name"] for c in shipped["static_resources"]["clusters"]] == ["xds"]
    assert shipped["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_settings_from_flags_env_and_file(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "edge.yaml"
    file.write_text("gateways: [{http: '127.0.0.1:9001', grpc: '127.0.0.1:9101'}]\n"
                    "listen: '127.0.0.1:8081'\n")
    monkeypatch.setenv("KVMESH_EDGE_ROUTER", "127.0.0.1:50051")
    config = load_settings(EdgeServiceConfig, file, port=0)
    assert (config.port, config.listen, config.router) == (0, "127.0.0.1:8081", "127.0.0.1:50051")
    assert [(g.http, g.grpc) for g in config.gateways] == [("127.0.0.1:9001", "127.0.0.1:9101")]
    assert config.host == "127.0.0.1" and not config.envoy


@pytest.mark.parametrize("field,value", [("listen", "8080"), ("router", "host:"),
                                         ("gateways", [{"http": "x:1", "grpc": "nope"}])])
def test_addresses_must_be_host_port(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        load_settings(EdgeServiceConfig, None, **{field: value})


def test_a_gateway_flag_names_both_doors() -> None:
    assert _gateway("127.0.0.1:9001,127.0.0.1:9101") == {
        "http": "127.0.0.1:9001", "grpc": "127.0.0.1:9101"}
    with pytest.raises(ValueError):
        _gateway("127.0.0.1:9001")
