"""A bounded chaos run, as CI runs it: `twopc chaos` with a fixed seed for well under 3 minutes.

Real processes, real signals, the fault proxy on every hop and failpoints armed at run time;
the command's own invariant check must pass, and its report must show that the faults happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from twopc.testing.playground.cluster import wait_until

DURATION_S = 32
SEED = 20261129


@pytest.mark.timeout(240)
def test_bounded_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    directory = tmp_path / "chaos"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twopc.cli",
            "chaos",
            f"--dir={directory}",
            f"--duration={DURATION_S}",
            f"--seed={SEED}",
            "--mean-gap=2.5",
            "--workers=6",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((directory / "chaos-report.json").read_text())
    assert report["ok"] is True
    assert all(v["holds"] for v in report["invariants"])
    assert report["mutual_tls"] is True, "chaos runs with TLS on by default"
    assert "mutual TLS on every hop" in result.stdout
    assert report["operations"]["committed"] > 100
    assert sum(report["faults_by_kind"].values()) == report["faults_planned"] >= 8
    killed = {f["target"].split("-")[0] for f in report["faults"] if f["kind"] == "kill"}
    assert killed == {"coordinator", "agent", "mariadb", "relay", "rabbitmq"}, "every kind killed"
    names = {v["name"].split()[0] for v in report["invariants"]}
    assert {"I8", "I9"} <= names, "the outbox's invariants were checked"
    assert report["outbox"]["committed"] > 5, "transactions published through the outbox"
    assert report["outbox"]["messages_committed"] > 5
    assert {"cut", "latency"} <= set(report["faults_by_kind"]), "links were cut and slowed"
    assert report["quiescence_after_last_heal_s"] < 30
    assert (directory / "chaos-timeline.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def _restarts(directory: Path) -> int:
    starts = 0
    for log in [*directory.glob("*/agent.log"), directory / "coordinator" / "coordinator.log"]:
        if log.exists():
            text = log.read_text(errors="replace")
            starts += max(
                text.count('"agent_ready"') + text.count('"coordinator_listening"') - 1, 0
            )
    return starts


def _processes_under(directory: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(directory) in command:
            found.append(int(proc.name))
    return found


@pytest.mark.timeout(240)
def test_an_interrupted_chaos_run_leaves_no_process_behind(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a run: the injector stops before the cluster goes down, so no
    component it restarts outlives the run (a stray agent once met the next run in the same
    directory, bound to its port)."""
    directory = tmp_path / "chaos"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twopc.cli",
            "chaos",
            f"--dir={directory}",
            "--duration=60",
            f"--seed={SEED}",
            "--mean-gap=0.5",  # faults, restarts among them, all the time
            "--workers=4",
            "--no-outbox",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # A component restarted by the harness writes a second start line to its log.
        wait_until(lambda: _restarts(directory) > 0, 60, "the harness restarting a component")
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    try:
        wait_until(lambda: not _processes_under(directory), 30, "every process of the run gone")
    finally:  # a failing run must not leave its cluster on the machine
        for pid in _processes_under(directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_bounded_chaos_run_of_a_coordinator_group_keeps_every_invariant(tmp_path: Path) -> None:
    """Three members on a 3-node Galera store: members and store nodes are killed and
    stopped, a member is cut off from the store or from an agent, a member's clocks run at 0.3x
    (libfaketime), while transfers run through the first member; the others take its id over
    whenever it stops renewing its lease."""
    directory = tmp_path / "group-chaos"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twopc.cli",
            "chaos",
            f"--dir={directory}",
            "--duration=24",
            f"--seed={SEED}",
            "--coordinators=3",
            "--regions=eu,us",
            "--faults=kill,stop,cut,slow_clock",
            "--mean-gap=2.5",
            "--workers=6",
            "--no-outbox",  # the single coordinator's run covers the outbox
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((directory / "chaos-report.json").read_text())
    assert report["ok"] is True
    assert all(v["holds"] for v in report["invariants"])
    assert report["operations"]["committed"] > 50
    killed = {f["target"] for f in report["faults"] if f["kind"] == "kill"}
    assert any(t.startswith("store-") for t in killed), "a store node was killed"
    assert any(t.startswith("coordinator") for t in killed), "a member was killed"
    assert report["faults_by_kind"].get("slow_clock", 0) >= 1, "a member's clock was slowed"
    assert report["quiescence_after_last_heal_s"] < 30
    assert not _processes_under(directory), "nothing of the run outlives it"
