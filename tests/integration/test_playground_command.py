"""``twopc playground`` as a user runs it: a fixed port that is taken."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.ports import COORDINATOR_PORT, LOOPBACK

ROOT = Path(__file__).resolve().parents[2]


def twopc(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TWOPC_COORDINATOR"}
    return subprocess.run(
        [sys.executable, "-m", "twopc.cli", *arguments],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def state(cwd: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((cwd / ".twopc-playground" / "state.json").read_text())
    return loaded


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Path]:
    """A one-region playground started with --detach in ``tmp_path``; stopped afterwards."""
    started = twopc("playground", "--detach", "--regions", "eu", "--no-examples", cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield tmp_path
    finally:
        twopc("playground", "--down", cwd=tmp_path)


def answers(component: dict[str, Any]) -> bool:
    with grpc.insecure_channel(component["address"]) as channel:
        try:
            if component["kind"] == "agent":
                pb_grpc.ParticipantStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
            else:
                pb_grpc.CoordinatorStub(channel).GetTransaction(
                    pb.GetTransactionRequest(request_id="probe"), timeout=5
                )
        except grpc.RpcError:
            return False
    return True


def test_a_taken_fixed_port_is_replaced_and_the_lookup_still_finds_the_coordinator(
    tmp_path: Path,
) -> None:
    holder = socket.socket()
    with contextlib.closing(holder):
        with contextlib.suppress(OSError):  # taken by someone else already: as good
            holder.bind((LOOPBACK, COORDINATOR_PORT))
            holder.listen()
        started = twopc("playground", "--detach", "--regions", "eu", "--no-examples", cwd=tmp_path)
        try:
            assert started.returncode == 0, started.stdout + started.stderr
            address = state(tmp_path)["client_address"]
            assert address != f"{LOOPBACK}:{COORDINATOR_PORT}"
            assert f"(port {COORDINATOR_PORT} was taken)" in started.stdout
            assert f"export TWOPC_COORDINATOR={address}" in started.stdout
            # From the same directory, twopc tx finds it through the state file.
            lookup = twopc("tx", "--request-id", "never-ran", cwd=tmp_path)
            assert lookup.returncode == 3, lookup.stdout + lookup.stderr
        finally:
            twopc("playground", "--down", cwd=tmp_path)
