"""The images, built here and run: buildah (no daemon) builds the router and edge images
from a Debian base made with debootstrap (scripts/images.sh), then each image's own
entry point runs (buildah run, host network, the image's user) and its own HEALTHCHECK
command, run inside the image, reports it serving; the edge image's Envoy is configured
by its control plane from the router in the other image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TAG = "0.1.0"


def buildah(*args: str, timeout_s: float = 120) -> str:
    out = subprocess.run(["buildah", *args], capture_output=True, text=True,
                         timeout=timeout_s, env={**os.environ, "BUILDAH_ISOLATION": "chroot"})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def images() -> None:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "images.sh"), "router", "edge"],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def config(image: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", image))["Docker"]["config"]


@dataclass
class Container:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def died(self) -> str:
        """'' while the entry point runs; else its exit and the end of its logs."""
        if self.proc.poll() is None:
            return ""
        inside = subprocess.run(["buildah", "run", self.name, "--", "sh", "-c",
                                 "tail -c 3000 /tmp/edge/envoy.log 2>/dev/null"],
                                capture_output=True, text=True, timeout=30,
                                env={**os.environ, "BUILDAH_ISOLATION": "chroot"}).stdout
        return (f"exit {self.proc.returncode}\n{self.log.read_text()[-3000:]}\n"
                f"--- envoy.log inside\n{inside}")


@contextmanager
def running(image: str, env: dict[str, str], log: Path) -> Iterator[Container]:
    """The image's entry point in a working container."""
    name = buildah("from", "--name", f"kvm-test-{image.split('/')[-1].split(':')[0]}-"
                   f"{os.getpid()}", image)
    flags = [f"--env={k}={v}" for k, v in env.items()]
    entry = config(image)["Entrypoint"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(["buildah", "run", "--network", "host", *flags, name, "--",
                                 *entry], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "BUILDAH_ISOLATION": "chroot"})
    try:
        yield Container(name, proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        buildah("rm", name)


def healthy(image: str, container: Container, port: int, timeout_s: float = 90) -> float:
    """Seconds until the image's own HEALTHCHECK command (its port set to ``port``),
    run inside the container, succeeds."""
    check = [a.replace(":50051", f":{port}").replace(":18000", f":{port}")
             for a in config(image)["Healthcheck"]["Test"][1:]]
    started = time.monotonic()
    while True:
        assert not container.died(), container.died()
        out = subprocess.run(["buildah", "run", "--network", "host", container.name, "--",
                              *check],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "BUILDAH_ISOLATION": "chroot"})
        if out.returncode == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, out.stdout + out.stderr
        time.sleep(1)


def test_router_and_edge_images_run_and_pass_their_health_checks(
        images: None, tmp_path: Path) -> None:
    router_image, edge_image = (f"localhost/kvmesh/{s}:{TAG}" for s in ("router", "edge"))
    for image in (router_image, edge_image):
        assert config(image)["User"] == "10001"
    router_port, ads_port, listen, admin = (free_port() for _ in range(4))
    with running(router_image, {"KVMESH_ROUTER_HOST": "127.0.0.1",
                                "KVMESH_ROUTER_PORT": str(router_port),
                                "KVMESH_ROUTER_METRICS_PORT": "0"},
                 tmp_path / "router.log") as router:
        healthy(router_image, router, router_port)
        uid = buildah("run", router.name, "--", "id", "-u")
        assert uid == "10001"
        with running(edge_image, {
                "KVMESH_EDGE_HOST": "127.0.0.1", "KVMESH_EDGE_PORT": str(ads_port),
                "KVMESH_EDGE_ROUTER": f"127.0.0.1:{router_port}",
                "KVMESH_EDGE_LISTEN": f"127.0.0.1:{listen}",
                "KVMESH_EDGE_ADMIN_PORT": str(admin)}, tmp_path / "edge.log") as edge:
            healthy(edge_image, edge, ads_port)
            deadline = time.monotonic() + 60
            while True:  # the image's Envoy took its listener from the control plane
                try:
                    if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=2).text.strip() \
                            == "LIVE":
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and not edge.died(), edge.died()
                time.sleep(0.5)
            listeners = httpx.get(f"http://127.0.0.1:{admin}/listeners", timeout=5).text
            assert f"127.0.0.1:{listen}" in listeners
