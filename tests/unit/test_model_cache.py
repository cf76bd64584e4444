"""The node cache for bucket models: atomic finish, resume, lock, download-once."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.models.cache import (
    RemoteFile,
    Sink,
    cache_entry,
    fetch_folder,
    split_bucket_uri,
)
from kvmesh.models.embedded import is_prepared

pytestmark = pytest.mark.unit

WEIGHTS = bytes(range(256)) * 64
MODEL = {"config.json": b'{"model_type": "llama"}', "sub/model.safetensors": WEIGHTS}


class FakeFolder:
    """An in-memory bucket folder that counts what is asked of it and can fail mid-file."""

    def __init__(self, objects: dict[str, bytes], uri: str = "s3://bucket/models/m") -> None:
        self.uri = uri
        self.objects = dict(objects)
        self.versions = dict.fromkeys(objects, "v1")
        self.listings = 0
        self.downloads: Counter[str] = Counter()
        self.starts: list[tuple[str, int]] = []
        self.fail_after: dict[str, int] = {}
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def list_files(self) -> list[RemoteFile]:
        self.listings += 1
        return [RemoteFile(n, len(b), self.versions[n]) for n, b in sorted(self.objects.items())]

    def download(self, file: RemoteFile, out: Sink, start: int) -> None:
        with self._lock:
            self.downloads[file.name] += 1
            self.starts.append((file.name, start))
        if self.gate is not None:
            assert self.gate.wait(30), "the other resolver never waited for the lock"
        data = self.objects[file.name][start:]
        cut = self.fail_after.pop(file.name, None)
        if cut is not None:
            out.write(data[:cut])
            raise ConnectionResetError("connection reset by peer")
        out.write(data[: len(data) // 2])
        out.write(data[len(data) // 2:])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".kvmesh-")}


class _Waiting(logging.Handler):
    """Sets an event when a resolver logs that it waits for another one's download."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("waiting for another process"):
            self.event.set()


@pytest.fixture
def waiting(caplog: pytest.LogCaptureFixture) -> threading.Event:
    caplog.set_level(logging.INFO, logger="kvmesh.models.cache")
    event = threading.Event()
    handler = _Waiting(event)
    logging.getLogger("kvmesh.models.cache").addHandler(handler)
    yield event
    logging.getLogger("kvmesh.models.cache").removeHandler(handler)


def test_fetch_writes_a_prepared_folder_once(tmp_path: Path) -> None:
    remote = FakeFolder(MODEL)
    entry = fetch_folder(remote, tmp_path)
    assert entry == cache_entry(tmp_path, remote.uri) and is_prepared(entry)
    assert _files(entry) == MODEL
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, entry.name + ".lock"])
    # Cached: the next resolve neither lists nor downloads.
    assert fetch_folder(remote, tmp_path) == entry
    assert remote.listings == 1 and remote.downloads == Counter(MODEL.keys())


def test_an_interrupted_download_is_never_used_and_resumes(tmp_path: Path) -> None:
    remote = FakeFolder(MODEL)
    remote.fail_after["sub/model.safetensors"] = 5000
    with pytest.raises(ConnectionResetError):
        fetch_folder(remote, tmp_path)
    entry = cache_entry(tmp_path, remote.uri)
    assert not entry.exists() and not is_prepared(entry)

    assert _files(fetch_folder(remote, tmp_path)) == MODEL
    # config.json was complete: kept. The weights went on from byte 5000.
    assert remote.downloads == Counter({"config.json": 1, "sub/model.safetensors": 2})
    assert remote.starts[-1] == ("sub/model.safetensors", 5000)
    assert not entry.with_name(entry.name + ".partial").exists()


def test_a_changed_object_is_fetched_anew_not_resumed(tmp_path: Path) -> None:
    remote = FakeFolder(MODEL)
    remote.fail_after["sub/model.safetensors"] = 5000
    with pytest.raises(ConnectionResetError):
        fetch_folder(remote, tmp_path)
    remote.objects["sub/model.safetensors"] = new = bytes(reversed(WEIGHTS))
    remote.versions["sub/model.safetensors"] = "v2"
    assert _files(fetch_folder(remote, tmp_path))["sub/model.safetensors"] == new
    assert remote.starts[-1] == ("sub/model.safetensors", 0)


def test_two_concurrent_resolvers_download_once(tmp_path: Path,
                                                waiting: threading.Event) -> None:
    # The first resolver's download cannot finish before the second one waits on the
    # lock, so the second always finds the first's finished folder.
    remote = FakeFolder(MODEL)
    remote.gate = waiting
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_folder(remote, tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2 and results[0] == results[1] and _files(results[0]) == MODEL
    assert remote.downloads == Counter(MODEL.keys()) and remote.listings == 1


def test_the_lock_waits_for_its_holder_and_frees_when_it_closes(
        tmp_path: Path, waiting: threading.Event) -> None:
    remote = FakeFolder(MODEL)
    entry = cache_entry(tmp_path, remote.uri)
    fd = os.open(entry.with_name(entry.name + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process downloading (or dead mid-way)
    resolver = threading.Thread(target=fetch_folder, args=(remote, tmp_path))
    resolver.start()
    assert waiting.wait(30)
    assert remote.listings == 0 and not entry.exists()
    os.close(fd)  # the kernel releases a dead holder's lock the same way
    resolver.join(timeout=60)
    assert is_prepared(entry) and remote.downloads == Counter(MODEL.keys())


def test_adapters_are_models_too_and_bookkeeping_is_not_copied(tmp_path: Path) -> None:
    adapter = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": WEIGHTS,
               ".kvmesh-prepared.json": b'{"format": 0}'}
    entry = fetch_folder(FakeFolder(adapter, "gs://b/adapters/a"), tmp_path)
    assert is_prepared(entry)
    assert _files(entry).keys() == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize(("objects", "message"), [
    ({}, "no objects under this prefix"),
    ({"README.md": b"hi"}, "not a model or LoRA adapter folder"),
    ({"config.json": b"{}", "../escape": b"x"}, "would leave the model folder"),
])
def test_what_is_not_a_model_folder_is_refused(tmp_path: Path, objects: dict[str, bytes],
                                               message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message) as info:
        fetch_folder(FakeFolder(objects), tmp_path / "cache")
    assert info.value.message.startswith("s3://bucket/models/m: ")
    assert not (tmp_path / "escape").exists()


def test_progress_shows_bytes_and_files(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    fetch_folder(FakeFolder(MODEL), tmp_path)
    err = capsys.readouterr().err
    assert "fetching s3://bucket/models/m" in err and "2/2 files" in err
    assert "16.0k/16.0k" in err  # bytes, in binary units


def test_cache_entries_are_readable_and_distinct(tmp_path: Path) -> None:
    a, b = cache_entry(tmp_path, "s3://bucket/a/b"), cache_entry(tmp_path, "s3://bucket/a-b")
    assert a.name.startswith("s3--bucket--a--b-") and a != b and a.parent == tmp_path


def test_bucket_uris() -> None:
    assert split_bucket_uri("s3://bucket/models/smol/") == ("bucket", "models/smol/")
    assert split_bucket_uri("gs://bucket") == ("bucket", "")
    with pytest.raises(ModelNotFoundError, match="no bucket"):
        split_bucket_uri("s3:///models")
