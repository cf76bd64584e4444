"""Workers serve models from s3:// (moto's S3 server), gs:// (gcp-storage-emulator) and
hf:// (a local Hugging Face cache, offline): real servers on 127.0.0.1, real clients,
the embedded SmolLM2 folder uploaded; fake engines, so no vLLM start."""

from __future__ import annotations

import filecmp
import io
import os
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.launch.procs import spawn_module, terminate, wait_ready_file
from kvmesh.models.gcs import GcsFolder
from kvmesh.models.s3 import S3Folder
from kvmesh.models.source import resolve_model
from tests.object_stores import (
    AWS_ISOLATION,
    GcsEmulator,
    MotoS3,
    make_adapter,
    populate_hf_cache,
)

pytestmark = pytest.mark.integration


@dataclass
class Stores:
    dir: Path
    s3: MotoS3
    gcs: GcsEmulator
    model: Path
    adapter: Path


@pytest.fixture(scope="module")
def stores(model_dir: Path) -> Iterator[Stores]:
    """Both stores, each holding the embedded SmolLM2 at ``models/smollm2`` and a LoRA
    adapter at ``adapters/smol-lora``."""
    with tempfile.TemporaryDirectory(prefix="kvm-ms-") as d:
        workdir = Path(d)
        s3 = MotoS3(workdir)
        try:
            gcs = GcsEmulator(workdir)
        except BaseException:
            s3.stop()
            raise
        try:
            adapter = make_adapter(workdir / "adapter")
            for store in (s3, gcs):
                store.upload(model_dir, "models", "smollm2")
                store.upload(adapter, "adapters", "smol-lora")
            yield Stores(workdir, s3, gcs, model_dir, adapter)
        finally:
            gcs.stop()
            s3.stop()


@pytest.fixture
def store_env(stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> dict[str, str]:
    """This test's process and its workers reach both stores and share a fresh cache."""
    env = {**stores.s3.env, **stores.gcs.env, "KVMESH_MODEL_CACHE": str(tmp_path / "cache")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def model_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".kvmesh-"))


def same_files(a: Path, b: Path) -> bool:
    names = model_files(a)
    return names == model_files(b) and filecmp.cmpfiles(a, b, names, shallow=False)[0] == names


def start_workers(workdir: Path, model: str, env: dict[str, str], count: int = 1
                  ) -> list[dict[str, Any]]:
    """``count`` fake-engine workers for ``model``, all started before any is waited for."""
    procs = []
    for i in range(count):
        ready = workdir / f"w{i}.ready"
        procs.append((ready, spawn_module(
            "kvmesh.worker",
            ["--no-ray", "--engine-kind", "fake", "--port", "0", "--worker-id", f"w{i}",
             "--ready-file", str(ready), "--run-dir", str(workdir), "--model", model],
            workdir / f"w{i}.log", env={**os.environ, **env})))
    try:
        infos = [wait_ready_file(ready, 120, proc, f"worker for {model}") for ready, proc in procs]
        for info in infos:
            with grpc.insecure_channel(info["endpoint"]) as channel:
                reply = vllm_engine_pb2_grpc.VllmEngineStub(channel).GetModelInfo(
                    vllm_engine_pb2.GetModelInfoRequest(), timeout=10)
            info["model_path"] = Path(reply.model_path)
            info["served"] = reply.served_model_name
        return infos
    except BaseException:
        for log in sorted(workdir.glob("w*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        for _, proc in procs:
            terminate(proc)


def test_two_workers_loading_one_s3_uri_download_it_once(
        stores: Stores, store_env: dict[str, str], tmp_path: Path) -> None:
    stores.s3.start_recording()
    workers = start_workers(tmp_path, "s3://models/smollm2", store_env, count=2)
    assert {w["model"] for w in workers} == {w["served"] for w in workers} == {"smollm2"}
    path = workers[0]["model_path"]
    assert workers[1]["model_path"] == path and path.parent == tmp_path / "cache"
    assert same_files(path, stores.model)
    # One GET per file across both workers: the second waited for the first's download.
    assert stores.s3.object_gets("models") == Counter(
        f"smollm2/{name}" for name in model_files(stores.model))


def test_a_worker_serves_from_gcs(stores: Stores, store_env: dict[str, str],
                                  tmp_path: Path) -> None:
    [worker] = start_workers(tmp_path, "gs://models/smollm2", store_env)
    assert worker["served"] == "smollm2"
    assert worker["model_path"].parent == tmp_path / "cache"
    assert same_files(worker["model_path"], stores.model)


def test_a_worker_serves_from_the_offline_hf_cache(stores: Stores, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    snapshot = populate_hf_cache(hf_home / "hub", "kvmesh-test/SmolLM2-135M-Instruct",
                                 stores.model)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    [worker] = start_workers(tmp_path, "hf://kvmesh-test/SmolLM2-135M-Instruct@main", env)
    assert worker["served"] == "kvmesh-test/SmolLM2-135M-Instruct"
    assert worker["model_path"] == snapshot
    assert same_files(worker["model_path"], stores.model)


@pytest.mark.parametrize("uri", ["s3://adapters/smol-lora", "gs://adapters/smol-lora"])
def test_lora_adapters_come_from_the_same_sources(
        stores: Stores, store_env: dict[str, str], uri: str) -> None:
    path = resolve_model(uri)
    assert path.parent == Path(store_env["KVMESH_MODEL_CACHE"])
    assert same_files(path, stores.adapter)


@pytest.mark.parametrize("folder", [S3Folder, GcsFolder])
def test_a_partial_file_resumes_with_a_ranged_read(
        stores: Stores, store_env: dict[str, str], folder: Any) -> None:
    remote = folder(f"{'s3' if folder is S3Folder else 'gs'}://models/smollm2")
    [weights] = [f for f in remote.list_files() if f.name == "model.safetensors"]
    start = weights.size - 3_000_000
    out = io.BytesIO()
    remote.download(weights, out, start)
    with open(stores.model / "model.safetensors", "rb") as original:
        original.seek(start)
        assert out.getvalue() == original.read()


@pytest.mark.parametrize(("uri", "message"), [
    ("s3://no-such-bucket/m", "s3://no-such-bucket/m: bucket 'no-such-bucket' does not exist"),
    ("s3://models/no-such-prefix", "s3://models/no-such-prefix: no objects under this prefix"),
    ("gs://no-such-bucket/m", "gs://no-such-bucket/m: bucket 'no-such-bucket' does not exist"),
    ("gs://models/no-such-prefix", "gs://models/no-such-prefix: no objects under this prefix"),
])
def test_what_is_missing_is_named(store_env: dict[str, str], uri: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(uri)
    assert info.value.message == message


def test_missing_aws_credentials_are_named(stores: Stores, store_env: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in AWS_ISOLATION.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ModelNotFoundError, match="s3://models/smollm2: no AWS credentials; "
                       "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        resolve_model("s3://models/smollm2")


def test_a_worker_without_its_model_exits_with_one_line(
        stores: Stores, store_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    proc = spawn_module("kvmesh.worker", ["--no-ray", "--engine-kind", "fake", "--port", "0",
                                          "--model", "s3://no-such-bucket/m"],
                        log, env={**os.environ, **store_env})
    try:
        assert proc.wait(timeout=120) == 2
    except subprocess.TimeoutExpired:
        terminate(proc)
        raise
    text = log.read_text()
    assert "s3://no-such-bucket/m: bucket 'no-such-bucket' does not exist" in text
    assert "Traceback" not in text
