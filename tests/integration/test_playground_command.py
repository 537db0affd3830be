"""``twopc playground`` as a user runs it: restarting a running (or frozen) component, a fixed
port that is taken, and a graceful stop that has to end in SIGKILL."""

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
from twopc.testing.playground.cluster import Cluster, Component, process_alive, wait_until
from twopc.testing.playground.ports import COORDINATOR_PORT, LOOPBACK
from twopc.testing.playground.tls import CLIENT, COORDINATOR

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


def answers(cwd: Path, name: str) -> bool:
    """The component answers, over mutual TLS as the playground's own tools call it."""
    cluster = Cluster.load(cwd / ".twopc-playground")
    component = state(cwd)["components"][name]
    identity = COORDINATOR if component["kind"] == "agent" else CLIENT
    with cluster.channel(name, identity=identity) as channel:
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


@pytest.mark.parametrize("frozen", [False, True], ids=["running", "frozen"])
@pytest.mark.parametrize("name", ["agent-eu", "coordinator"])
def test_restart_stops_a_running_component_and_starts_it_again(
    detached: Path, name: str, frozen: bool
) -> None:
    before = state(detached)["components"][name]
    if frozen:
        signalled = twopc("playground", "--kill", name, "--signal", "STOP", cwd=detached)
        assert signalled.returncode == 0, signalled.stderr
    done = twopc("playground", "--restart", name, cwd=detached)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{name} pid {before['pid']}: SIGTERM, exited after" in done.stdout
    after = state(detached)["components"][name]
    assert after["pid"] != before["pid"]
    assert f"{name} started again, pid {after['pid']}" in done.stdout
    assert not process_alive(before["pid"])
    assert process_alive(after["pid"])
    assert answers(detached, name)


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


def test_a_component_that_ignores_sigterm_is_sigkilled_after_the_bound(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    program = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring SIGTERM', flush=True); time.sleep(600)"
        f"  # {tmp_path}"  # a command line of its own: stop() takes every process that runs it
    )
    stubborn = Component(
        name="stubborn",
        kind="agent",
        address="",
        data_dir=str(tmp_path),
        command=[sys.executable, "-c", program],
        cwd=str(tmp_path),
        log=str(log),
    )
    cluster = Cluster(tmp_path, [], {"stubborn": stubborn})
    pid = stubborn.spawn()
    wait_until(lambda: "ignoring SIGTERM" in log.read_text(), 30, "the handler installed")
    assert cluster.stop("stubborn", timeout=0.5) == [
        f"pid {pid}: still running 0.5 s after SIGTERM, SIGKILLed"
    ]
    assert not process_alive(pid)
