"""Free ports for the playground are picked where no outgoing connection can take them."""

from __future__ import annotations

import socket

import pytest

from twopc.testing.playground import ports


def test_a_free_port_lies_outside_the_ephemeral_range_and_is_never_handed_out_twice() -> None:
    low, high = ports._ephemeral_range()
    picked = [ports.free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)
    assert all(not low <= port <= high for port in picked)
    assert all(port >= 10000 for port in picked)


def test_a_port_something_listens_on_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((ports.LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_candidates", lambda: range(port, port + 1))
        monkeypatch.setattr(ports, "_kernel_pick", lambda _host: -1)
        assert ports.free_port() == -1  # the only candidate is taken: it falls back


def test_without_room_beside_the_ephemeral_range_the_kernel_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports, "_ephemeral_range", lambda: (1024, 65535))
    assert ports._candidates() == range(0)
    assert ports.free_port() > 0
