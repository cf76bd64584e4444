"""The gRPC call-floor benchmark runs every server and reports a cost for each."""

from __future__ import annotations

import json

import pytest

from kvmesh.bench import grpc_floor


def test_every_server_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    assert grpc_floor.main(["--calls", "50", "--rounds", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["server"] for r in report["runs"]] == list(grpc_floor.SERVERS)
    for run in report["runs"]:
        assert run["server_cpu_us_per_call"] > 0 and run["round_trip_us"] > 0
