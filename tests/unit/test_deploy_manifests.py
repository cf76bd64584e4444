"""Kubernetes manifests and container images, checked without a cluster or a daemon.

Every kustomize overlay is rendered with the real `kubectl kustomize` and each object
validated against the Kubernetes schemas (kubernetes-validate, strict); the rules the
deploy docs promise (probes, resource requests, non-root) are checked on the rendered
output; every Dockerfile passes hadolint; and every KVMESH_* variable the manifests,
images and compose file set names a real config field, so a typo fails here instead of
being silently ignored by a pod.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from kvmesh.core.config import GatewayConfig, MeshConfig, RouterConfig, WorkerConfig
from kvmesh.core.edge_config import EdgeServiceConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
KUBERNETES_VERSION = "1.32.0"
#: Custom resources the schemas do not know; checked structurally below.
CUSTOM_KINDS = {"ServiceMonitor"}
PREFIXES: dict[str, type[BaseModel]] = {
    "KVMESH_ROUTER_": RouterConfig, "KVMESH_WORKER_": WorkerConfig,
    "KVMESH_GATEWAY_": GatewayConfig, "KVMESH_EDGE_": EdgeServiceConfig,
}


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(__import__("sys").executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is needed to check deploy/ (see DESIGN §7 / the dev extra)")
    return path


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, check=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Deployment", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_probed_sized_and_unprivileged(overlay: str) -> None:
    specs = pod_specs(render(overlay))
    assert {name for name, _ in specs} == {"kvmesh-router", "kvmesh-gateway", "kvmesh-worker",
                                           "kvmesh-edge"}
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            assert {"readinessProbe", "livenessProbe"} <= set(container), name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_gpu_workers_ask_for_a_gpu_and_cpu_workers_do_not() -> None:
    def worker(overlay: str) -> dict[str, Any]:
        return next(spec for name, spec in pod_specs(render(overlay)) if name == "kvmesh-worker")

    gpu = worker("gpu")["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["image"].startswith("kvmesh/worker-cuda")
    cpu = worker("cpu")["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert cpu["image"].startswith("kvmesh/worker-cpu")


def test_service_monitors_select_a_service_port() -> None:
    objects = render("cpu")
    services = [o for o in objects if o["kind"] == "Service"]
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 3
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        chosen = [s for s in services
                  if wanted.items() <= s["metadata"].get("labels", {}).items()]
        assert chosen, monitor["metadata"]["name"]
        ports = {p["name"] for s in chosen for p in s["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def _field_exists(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0].lower())
    if field is None:
        return False
    if len(path) == 1:
        return True
    inner = field.annotation
    return isinstance(inner, type) and issubclass(inner, BaseModel) and _field_exists(
        inner, path[1:])


def _kvmesh_variables() -> set[str]:
    texts = [p.read_text() for p in [*K8S.rglob("*.yaml"), *DOCKER.iterdir()]]
    for overlay in OVERLAYS:
        texts.append(yaml.safe_dump_all(render(overlay)))
    return {m for text in texts for m in re.findall(r"\bKVMESH_[A-Z0-9_]+", text)}


def test_every_kvmesh_variable_names_a_config_field() -> None:
    names = _kvmesh_variables()
    assert "KVMESH_WORKER_ADVERTISE_HOST" in names
    unknown = []
    for name in sorted(names):
        if name == "KVMESH_MODEL_CACHE":  # read by kvmesh.models, not a settings field
            continue
        prefix = next((p for p in PREFIXES if name.startswith(p)), None)
        model: type[BaseModel] = PREFIXES[prefix] if prefix else MeshConfig
        rest = name.removeprefix(prefix or "KVMESH_")
        if not _field_exists(model, rest.split("__")):
            unknown.append(name)
    assert unknown == []


def test_the_picker_overlay_turns_the_picker_on_at_both_ends() -> None:
    (config,) = [o for o in render("cpu-picker") if o["kind"] == "ConfigMap"]
    assert config["data"]["KVMESH_EDGE_PICKER"] == "true"
    assert config["data"]["KVMESH_GATEWAY_ENDPOINT_PICKER"] == "true"
    (plain,) = [o for o in render("cpu") if o["kind"] == "ConfigMap"]
    assert "KVMESH_EDGE_PICKER" not in plain["data"]
    # The edge's settings load from what the pods get (no unknown key, right types).
    edge = EdgeServiceConfig.model_validate(
        {k.removeprefix("KVMESH_EDGE_").lower(): v for k, v in config["data"].items()
         if k.startswith("KVMESH_EDGE_")})
    assert edge.picker and edge.envoy and edge.router == "kvmesh-router:50051"


def test_field_lookup_rejects_a_typo() -> None:
    assert _field_exists(WorkerConfig, ["ENGINE", "BLOCK_SIZE"])
    assert not _field_exists(WorkerConfig, ["ENGINE", "BLOCK_SIZES"])
    assert not _field_exists(RouterConfig, ["POLCY"])


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    out = subprocess.run([_tool("hadolint"), str(DOCKER / dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_run_as_non_root_with_a_health_check() -> None:
    for path in DOCKER.glob("*.Dockerfile"):
        if path.name == "wheel.Dockerfile":
            continue
        text = path.read_text()
        assert re.search(r"^USER 10001$", text, re.M), path.name
        assert "HEALTHCHECK" in text and "kvmesh.core.health_probe" in text, path.name


def _checkov() -> str:
    path = ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"
    if not path.exists():
        pytest.fail("checkov is needed to check deploy/ (scripts/install.sh installs it)")
    return str(path)


def _checkov_failures(*target: str) -> str:
    out = subprocess.run(
        [_checkov(), "--config-file", str(ROOT / "deploy" / "checkov.yaml"), *target],
        capture_output=True, text=True, timeout=300)
    assert "Passed checks:" in out.stdout, out.stdout + out.stderr
    return "" if out.returncode == 0 else out.stdout


def test_checkov_passes_every_dockerfile() -> None:
    assert _checkov_failures("-d", str(DOCKER), "--framework", "dockerfile") == ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes_every_rendered_overlay(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(render(overlay)))
    assert _checkov_failures("-f", str(rendered), "--framework", "kubernetes") == ""
