"""What a worker start that runs out of time reports."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from kvmesh.core.error_map import grpc_code_for
from kvmesh.launch.pool_runner import WorkerStartError, log_tail

pytestmark = pytest.mark.unit


def test_a_start_timeout_is_refused_as_unavailable_over_grpc() -> None:
    """A model added at run time whose workers never start: the admin call's status
    says so with the report (the error interceptor maps kvmesh errors by kind)."""
    assert grpc_code_for(WorkerStartError("1 worker(s) not ready")) == grpc.StatusCode.UNAVAILABLE


def test_the_log_tail_is_the_last_lines_of_even_a_large_or_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "worker.out"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert log_tail(log, 3) == ["line 99997", "line 99998", "line 99999"]
    assert log_tail(tmp_path / "gone.out", 3)[0].startswith("(unreadable: ")
