"""A bounded chaos run, as CI runs it: `twopc chaos` with a fixed seed for well under 3 minutes.

Real processes, real signals, the fault proxy on every hop and failpoints armed at run time;
the command's own invariant check must pass, and its report must show that the faults happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DURATION_S = 45
SEED = 20261129


@pytest.mark.timeout(240)
def test_bounded_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    directory = tmp_path / "chaos"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
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
    assert report["operations"]["committed"] > 100
    assert sum(report["faults_by_kind"].values()) == report["faults_planned"] >= 8
    killed = {f["target"].split("-")[0] for f in report["faults"] if f["kind"] == "kill"}
    assert killed == {"coordinator", "agent", "mariadb"}, "every component kind was killed"
    assert {"cut", "latency"} <= set(report["faults_by_kind"]), "links were cut and slowed"
    assert report["quiescence_after_last_heal_s"] < 30
    assert (directory / "chaos-timeline.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
