"""Ports picked now and bound later come from outside the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kvmesh.core import net


def test_a_picked_port_is_below_the_ephemeral_range_and_bindable() -> None:
    start = net.ephemeral_start()
    for _ in range(50):
        port = net.free_port()
        assert net.FIRST_PORT <= port < start
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        # The whole range is one port wide and taken: the pick falls back to port 0.
        monkeypatch.setattr(net, "FIRST_PORT", taken)
        monkeypatch.setattr(net, "ephemeral_start", lambda: taken + 1)
        port = net.free_port()
        assert port != taken
    finally:
        holder.close()


def test_an_unreadable_range_is_taken_as_linux_default(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(net, "_EPHEMERAL", tmp_path / "missing")
    assert net.ephemeral_start() == 32768

