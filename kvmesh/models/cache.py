"""The node's cache of models fetched from buckets: one download per node, never half used.

A model in a bucket is a folder of objects, and every worker on a node asks for the same
URI at about the same time (``kvmesh up`` starts them together). So:

- an exclusive ``flock`` on ``<entry>.lock`` lets one process download while the others
  wait; the kernel drops the lock when its holder dies, so a crashed download never
  wedges the node (a lock file that merely exists would);
- files land in ``<entry>.partial/``, each as ``NAME.part`` renamed to ``NAME`` once
  complete; the folder gets the prepared-marker and is renamed to ``<entry>`` only when
  every file is there, so a half-written model is never served;
- an interrupted download resumes: complete files stay, a ``.part`` continues from its
  size (a ranged read), and the listing kept beside them drops any file whose object
  changed (size, ETag or generation) in between.

The Hugging Face source does not come through here: the HF cache already does all of
this for hub repos (see ``hf.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.models.embedded import is_prepared, mark_prepared

log = logging.getLogger(__name__)

#: A folder vLLM can serve has one of these: a model's config, or a LoRA adapter's.
MODEL_MARKERS = ("config.json", "adapter_config.json")
_LISTING = ".kvmesh-listing.json"
_BOOKKEEPING = ".kvmesh-"  # the listing and the prepared-marker


@dataclass(frozen=True)
class RemoteFile:
    """One object of a remote model folder."""

    name: str  # path inside the model folder, '/'-separated
    size: int
    version: str  # ETag or generation: a resumed file must be the same object


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class RemoteFolder(Protocol):
    """A model folder in a bucket, as the cache needs it (one implementation per store)."""

    uri: str

    def list_files(self) -> list[RemoteFile]:
        """Every object under the folder; ModelNotFoundError naming what is missing."""
        ...

    def download(self, file: RemoteFile, out: Sink, start: int) -> None:
        """Write the bytes of ``file`` from offset ``start`` on to ``out``."""
        ...


class BucketFolder:
    """What every store's folder starts from: its URI, bucket and prefix."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.bucket, self.prefix = split_bucket_uri(uri)


def split_bucket_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b/")``: the prefix names a folder, so
    ``a/b`` must not also match ``a/bc/``."""
    _, _, rest = uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ModelNotFoundError(f"{uri}: no bucket in the URI (expected scheme://bucket/prefix)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def cache_entry(cache_dir: Path, uri: str) -> Path:
    """The folder a URI is cached in: readable (``s3--bucket--models--smol``) plus a short
    hash of the exact URI, so two URIs that read alike never share a folder."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "--", uri.replace("://", "--")).strip("-.")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return cache_dir / f"{readable[:100]}-{digest}"


@contextlib.contextmanager
def node_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` against every other process (and open file) on
    this node; it is released when the holder closes it or dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process on this node to fetch %s", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fetch_folder(remote: RemoteFolder, cache_dir: Path) -> Path:
    """The local copy of ``remote``, downloaded into the node cache unless already there."""
    entry = cache_entry(cache_dir, remote.uri)
    if is_prepared(entry):
        return entry
    with node_lock(entry.with_name(entry.name + ".lock"), remote.uri):
        if is_prepared(entry):  # another process fetched it while this one waited
            return entry
        # A folder uploaded from a kvmesh cache carries its bookkeeping: ours is written anew.
        files = [f for f in remote.list_files() if not f.name.startswith(_BOOKKEEPING)]
        check_model_files(remote.uri, [f.name for f in files])
        partial = entry.with_name(entry.name + ".partial")
        _keep_unchanged(partial, files, remote.uri)
        started = time.monotonic()
        with _Progress(remote.uri, files) as progress:
            for file in files:
                _fetch_file(remote, file, partial, progress)
        (partial / _LISTING).unlink()
        total = sum(f.size for f in files)
        mark_prepared(partial, {"source": remote.uri, "files": len(files), "bytes": total})
        if entry.exists():  # a folder without the marker: never complete, never used
            shutil.rmtree(entry)
        partial.rename(entry)
        log.info("fetched %s: %d files, %.1f MB in %.1fs into %s", remote.uri, len(files),
                 total / 1e6, time.monotonic() - started, entry)
    return entry


def check_model_files(uri: str, names: list[str]) -> None:
    """A folder of objects is worth downloading only if vLLM can serve it."""
    if not names:
        raise ModelNotFoundError(f"{uri}: no objects under this prefix")
    if not any(name in MODEL_MARKERS for name in names):
        raise ModelNotFoundError(
            f"{uri}: not a model or LoRA adapter folder (none of {', '.join(MODEL_MARKERS)} "
            f"among its {len(names)} objects)")


def _local_path(root: Path, name: str, uri: str) -> Path:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("..", ".") for p in parts):
        raise ModelNotFoundError(f"{uri}: object name {name!r} would leave the model folder")
    return root.joinpath(*parts)


def _keep_unchanged(partial: Path, files: list[RemoteFile], uri: str) -> None:
    """Before (re)starting: forget what an interrupted download left of any file whose
    object changed since, then record the listing this download works from."""
    listing = {f.name: [f.size, f.version] for f in files}
    if partial.exists():
        try:
            before = json.loads((partial / _LISTING).read_text())
        except (OSError, ValueError):  # no record of what these files were: start over
            shutil.rmtree(partial)
            before = {}
        for name, was in before.items():
            if listing.get(name) != was:
                path = _local_path(partial, name, uri)
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".part").unlink(missing_ok=True)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / _LISTING).write_text(json.dumps(listing))


def _fetch_file(remote: RemoteFolder, file: RemoteFile, partial: Path,
                progress: _Progress) -> None:
    dest = _local_path(partial, file.name, remote.uri)
    if dest.is_file() and dest.stat().st_size == file.size:
        progress.file_done(file.size)  # complete from an earlier, interrupted run
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    if start > file.size:
        start = 0
    if start:
        log.info("resuming %s at byte %d of %d", file.name, start, file.size)
    with open(part, "r+b" if start else "wb") as out:
        out.seek(start)
        out.truncate()
        progress.update(start)
        remote.download(file, _CountingSink(out, progress.update), start)
        out.flush()
        os.fsync(out.fileno())
    size = part.stat().st_size
    if size != file.size:
        raise ModelNotFoundError(
            f"{remote.uri}: {file.name} arrived with {size} of {file.size} bytes "
            "(starting again resumes it)")
    part.rename(dest)
    progress.file_done(0)


class _CountingSink:
    """Passes writes through and reports their sizes (the progress bar's bytes)."""

    def __init__(self, out: Sink, count: Callable[[int], object]) -> None:
        self._out = out
        self._count = count

    def write(self, data: bytes, /) -> int:
        written = self._out.write(data)
        self._count(len(data))
        return written


class _Progress:
    """One bar per folder: bytes (with rate and ETA) and, beside it, files done."""

    def __init__(self, uri: str, files: list[RemoteFile]) -> None:
        from tqdm import tqdm

        self._files = len(files)
        self._done = 0
        self._bar = tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True,
                         unit_divisor=1024, desc=f"fetching {uri}", mininterval=0.5)
        self._bar.set_postfix_str(f"0/{self._files} files", refresh=False)

    def update(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def file_done(self, nbytes: int) -> None:
        self._done += 1
        self._bar.set_postfix_str(f"{self._done}/{self._files} files", refresh=False)
        self._bar.update(nbytes)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
