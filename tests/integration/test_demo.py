"""``twopc demo`` as a user runs it with its output in a pipe: plain lines in order, and no
directory left behind, unless it failed (then it stays, for its logs, and the demo says where)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def demo(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
    arguments = ["--transfers", "60", "--workers", "4", "--accounts", "10", "--dir", str(directory)]
    return subprocess.run(
        [sys.executable, "-m", "twopc.cli", "demo", *arguments],
        cwd=directory.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,  # stdout is a pipe, not a terminal
        text=True,
        timeout=300,
        check=False,
    )


def test_the_demo_in_a_pipe_prints_plain_lines_and_removes_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / ".twopc-demo"
    done = demo(directory)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\r" not in done.stdout
    assert "all invariants hold" in done.stdout
    assert not directory.exists()

    # The transfers' part: events and progress lines in the order they happened.
    lines = done.stdout.splitlines()
    timed = [line for line in lines if re.match(r"\s+(! +)?[\d.]+s  ", line)]
    moments = [float(re.findall(r"([\d.]+)s  ", line)[0]) for line in timed]
    assert moments == sorted(moments), "\n".join(timed)
    killed = next(i for i, line in enumerate(timed) if "coordinator SIGKILLed" in line)
    restarted = next(i for i, line in enumerate(timed) if "coordinator restarted" in line)
    assert killed < restarted
    assert re.search(r"transfers +60/60 ", timed[-1])


def test_a_failed_demo_keeps_its_directory_and_says_where(tmp_path: Path) -> None:
    directory = tmp_path / ".twopc-demo"
    # A coordinator that cannot start: its setting from the environment is not a number.
    done = demo(directory, TWOPC_COORDINATOR_MAX_ACTIVE="many")
    assert done.returncode == 1
    assert f"the cluster's directory is kept for its logs: {directory}" in done.stdout
    assert "coordinator exited while starting" in done.stderr
    assert "Traceback" not in done.stderr
    assert "MAX_ACTIVE" in (directory / "coordinator" / "coordinator.log").read_text()
