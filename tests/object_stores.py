"""Real object stores for the model-source tests, each a subprocess on 127.0.0.1 stopped
by PID: moto's S3 server (which can record the requests it serves, so a test counts
the GETs a download made) and gcp-storage-emulator; plus a Hugging Face cache laid out
as huggingface_hub writes it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from kvmesh.core.net import free_port
from kvmesh.launch.procs import terminate

#: AWS settings that keep boto on the test's server and away from any other host
#: (no instance-metadata probe, no user config).
AWS_ISOLATION = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
                 "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def _start(args: list[str], ready: re.Pattern[str], log: Path, env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start a server, read its output up to the line that says it listens (a server that
    dies first ends the output), then keep copying its output to ``log``."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env=env)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = ready.search(line)
        if match:
            break
    else:
        terminate(proc)
        raise RuntimeError(f"{args} exited before listening:\n{''.join(seen)}")

    def drain() -> None:
        with open(log, "a") as out:
            out.writelines(seen)
            for line in proc.stdout:  # type: ignore[union-attr]
                out.write(line)

    threading.Thread(target=drain, daemon=True).start()
    return proc, match


class MotoS3:
    """``moto_server`` on a port of its choosing; its request recording in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.proc, match = _start(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                  re.compile(r"Running on (http://127\.0\.0\.1:\d+)"),
                                  workdir / "moto.log",
                                  {**os.environ,
                                   "MOTO_RECORDER_FILEPATH": str(workdir / "moto-recording")})
        self.endpoint = match.group(1)
        self.env = {**AWS_ISOLATION, "AWS_ENDPOINT_URL_S3": self.endpoint,
                    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")

    def start_recording(self) -> None:
        """From now on the server records every request it serves."""
        for action in ("reset-recording", "start-recording"):
            httpx.post(f"{self.endpoint}/moto-api/recorder/{action}").raise_for_status()

    def object_gets(self, bucket: str) -> Counter[str]:
        """Recorded GETs of single objects (not listings) in ``bucket``, by key. The
        server records a request before it answers it, so every GET a client has seen
        an answer to is here."""
        text = httpx.get(f"{self.endpoint}/moto-api/recorder/download-recording").text
        gets: Counter[str] = Counter()
        for line in filter(None, text.splitlines()):
            entry = json.loads(line)
            url = urlsplit(entry["url"])
            path = unquote(url.path).lstrip("/")
            if entry["method"] == "GET" and path.startswith(f"{bucket}/") and not url.query:
                gets[path.removeprefix(f"{bucket}/")] += 1
        return gets

    def stop(self) -> None:
        terminate(self.proc)


class GcsEmulator:
    """``gcp-storage-emulator`` in memory on a free port (it cannot report a port 0)."""

    def __init__(self, workdir: Path) -> None:
        port = free_port()
        self.proc, _ = _start(["-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1",
                               "--port", str(port), "--in-memory"],
                              re.compile(r"All services started"), workdir / "gcs.log")
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint, "GOOGLE_CLOUD_PROJECT": "test"}

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        target = client.bucket(bucket)
        if not target.exists():
            target = client.create_bucket(bucket)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            target.blob(f"{prefix}/{path.relative_to(folder)}").upload_from_filename(str(path))

    def stop(self) -> None:
        terminate(self.proc)


def populate_hf_cache(hub_cache: Path, repo_id: str, folder: Path,
                      commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``folder`` out in a Hugging Face hub cache as huggingface_hub does
    (``models--org--name/{refs/main, snapshots/<commit>/…, blobs/…}``), its files
    symlinked to blobs; returns the snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        # The weights by symlink (the test needs no second copy); small files copied.
        if path.stat().st_size > 1 << 20:
            blob.symlink_to(path)
        else:
            shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def make_adapter(folder: Path, seed: int = 0) -> Path:
    """A small LoRA adapter in PEFT's layout for SmolLM2 (r=8 on q/v of layer 0)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": "SmolLM2-135M-Instruct", "r": 8,
        "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM"}))
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, out_dim in (("q_proj", 576), ("v_proj", 192)):
        stem = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((8, 576), dtype=np.float32)
        tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((out_dim, 8), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder
