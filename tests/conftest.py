"""Shared fixtures: the prepared embedded model, free ports, service processes."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The mesh's internal token (the router refuses registrations without it): one per test
# session, inherited by every service process and Ray actor the tests start.
os.environ.setdefault("KVMESH_INTERNAL_TOKEN", secrets.token_urlsafe(24))


def pytest_sessionstart(session: pytest.Session) -> None:
    # Compile (or load) the router's kernels once, before any test's clock or
    # hypothesis deadline runs: a cold numba cache costs seconds on first call.
    from kvmesh.router import kernels

    kernels.warm_up()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from kvmesh.models.embedded import prepare_embedded_chat_model

    return prepare_embedded_chat_model()


@pytest.fixture(scope="session")
def backend_tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Short path: IPC socket names are limited to ~100 bytes.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvm-") as d:
        yield Path(d)
