"""A coordinator killed with SIGKILL loses no acknowledged commit decision.

A child process records COMMITs from many tasks and prints each txid once ``record_commit``
returned; the parent kills it after a few hundred acknowledgements, reopens the log (cutting a torn
tail, dropping a half-done compaction) and checks that every acknowledged decision is there. Three
rounds on the same log, so that each round also reopens a log left by a killed process.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.decision_log import Replay
from coordinator.decision_log.file_log import FileDecisionLog

pytestmark = pytest.mark.fault

CHILD = Path(__file__).with_name("decision_log_child.py")
REPO = Path(__file__).resolve().parents[2]
ACKS_BEFORE_KILL = 400
DEADLINE = 30.0


def run_until_killed(log: Path | str, prefix: str, child_script: Path = CHILD) -> list[str]:
    """Starts the child (``child_script LOG PREFIX 64 10000000``: LOG is the file log's directory
    or a store's URL), kills it after ACKS_BEFORE_KILL acknowledgements, returns every txid it
    acknowledged (including those printed between the count and the kill)."""
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    child = subprocess.Popen(
        [sys.executable, str(child_script), str(log), prefix, "64", "10000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    output = b""
    deadline = time.monotonic() + DEADLINE
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            while (acks := output.count(b"\n")) < ACKS_BEFORE_KILL:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {acks} acknowledgements in {DEADLINE} s"
                if selector.select(remaining):
                    chunk = os.read(child.stdout.fileno(), 1 << 16)
                    assert chunk, f"the child exited early: {child.communicate()[1].decode()}"
                    output += chunk
    finally:
        child.send_signal(signal.SIGKILL)
        rest, errors = child.communicate(timeout=DEADLINE)
    assert child.returncode == -signal.SIGKILL, errors.decode()
    output += rest
    return [line.decode() for line in output.split(b"\n")[:-1]]  # a line counts once complete


async def reopened(directory: Path) -> Replay:
    log = FileDecisionLog(directory)
    replay = await log.open()
    await log.close()
    return replay


def test_no_acknowledged_commit_is_lost_to_sigkill(tmp_path: Path) -> None:
    never_ended: list[str] = []
    for round_number in range(3):
        acknowledged = run_until_killed(tmp_path, f"k{round_number}")
        assert len(acknowledged) == len(set(acknowledged)) >= ACKS_BEFORE_KILL
        never_ended += [txid for txid in acknowledged if int(txid.rpartition(".")[2]) % 2]
        replay = asyncio.run(asyncio.wait_for(reopened(tmp_path), DEADLINE))
        still_open = {record.txid for record in replay.open_commits}
        missing = [txid for txid in never_ended if txid not in still_open]
        assert not missing, f"acknowledged but lost: {missing[:10]} ({len(missing)} in all)"
