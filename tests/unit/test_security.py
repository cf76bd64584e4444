"""Security between services, the pure parts: the internal-token check, secrets kept
out of dumps unless a child process's own config is written, one token for a whole
`kvmesh up` mesh, and TLS files checked when the config is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from kvmesh.core.config import RouterConfig
from kvmesh.core.errors import AuthenticationError
from kvmesh.core.internal_auth import TOKEN_METADATA_KEY, check_internal_token, token_metadata
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.security_config import REVEAL_SECRETS, SecurityConfig, TlsConfig
from kvmesh.core.settings import dump_settings, load_settings
from kvmesh.launch.services import with_mesh_security

TOKEN = SecretStr("s3cret-token")


def test_the_right_token_passes_and_anything_else_is_refused() -> None:
    check_internal_token(token_metadata(TOKEN), TOKEN, "RegisterWorker")
    check_internal_token([(TOKEN_METADATA_KEY, b"s3cret-token")], TOKEN, "Heartbeat")
    for metadata, words in (((), "needs the mesh's internal token"),
                            (((TOKEN_METADATA_KEY, "nope"),), "wrong internal token"),
                            ((("authorization", "s3cret-token"),), "needs")):
        with pytest.raises(AuthenticationError, match=words) as refused:
            check_internal_token(metadata, TOKEN, "RegisterWorker")
        assert refused.value.param == TOKEN_METADATA_KEY
        assert "s3cret-token" not in refused.value.message


def test_a_router_without_a_token_refuses_everyone() -> None:
    with pytest.raises(AuthenticationError, match="no internal token configured"):
        check_internal_token(token_metadata(TOKEN), None, "RegisterWorker")


def test_the_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMESH_INTERNAL_TOKEN", "from-env")
    assert RouterConfig().security.internal_token == SecretStr("from-env")
    monkeypatch.setenv("KVMESH_ROUTER_SECURITY__INTERNAL_TOKEN", "router-own")
    assert RouterConfig().security.internal_token == SecretStr("router-own")
    monkeypatch.delenv("KVMESH_INTERNAL_TOKEN")
    monkeypatch.delenv("KVMESH_ROUTER_SECURITY__INTERNAL_TOKEN")
    assert RouterConfig().security.internal_token is None


def test_secrets_are_masked_in_dumps_but_reach_a_child_config(tmp_path: Path) -> None:
    config = RouterConfig(security=SecurityConfig(internal_token=TOKEN))
    assert "s3cret-token" not in repr(config) + config.model_dump_json()
    assert "s3cret-token" in config.model_dump_json(context=REVEAL_SECRETS)
    path = dump_settings(config, tmp_path / "router.json")
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["security"]["internal_token"] == "s3cret-token"
    assert load_settings(RouterConfig, path).security.internal_token == TOKEN


def test_kvmesh_up_gives_every_service_one_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMESH_INTERNAL_TOKEN", raising=False)
    mesh = with_mesh_security(MeshConfig())
    tokens = {s.security.internal_token for s in (mesh.router, mesh.gateway, mesh.worker)}
    assert len(tokens) == 1 and None not in tokens
    assert len(tokens.pop().get_secret_value()) >= 32  # type: ignore[union-attr]
    given = with_mesh_security(MeshConfig(gateway={"security": {"internal_token": "mine"}}))
    assert given.router.security.internal_token == SecretStr("mine")
    assert given.worker.security.internal_token == SecretStr("mine")


def test_mesh_wide_tls_reaches_every_service(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("ca.crt", "me.crt", "me.key")}
    for path in files.values():
        path.write_text("pem")
    tls = {"ca_file": files["ca.crt"], "cert_file": files["me.crt"], "key_file": files["me.key"]}
    mesh = with_mesh_security(MeshConfig(security={"tls": tls}))
    assert [s.security.tls for s in (mesh.router, mesh.gateway, mesh.worker)] == [
        TlsConfig(**tls)] * 3


def test_missing_certificate_files_fail_when_the_config_is_read(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cert_file"):
        RouterConfig(security={"tls": {"ca_file": __file__, "cert_file": tmp_path / "none",
                                       "key_file": __file__}})
