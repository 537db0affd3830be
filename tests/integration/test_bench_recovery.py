"""``twopc bench-recovery`` end to end, small: in-doubt transactions of both kinds, a SIGKILLed
coordinator, and a report that agrees with the rows and the log (the figure itself is not
asserted: that is the benchmark's job, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

IN_DOUBT = 30


@pytest.mark.timeout(240)
def test_bench_recovery_resolves_every_in_doubt_transaction(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twopc.cli",
            "bench-recovery",
            f"--in-doubt={IN_DOUBT}",
            f"--dir={tmp_path / 'cluster'}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "bench-recovery.json").read_text())
    assert report["in_doubt"] == IN_DOUBT
    assert report["mismatches"] == []
    assert report["committed"] + report["rolled_back"] == IN_DOUBT
    assert report["committed"] == report["decided_commit"]
    assert 0 < report["decided_commit"] < IN_DOUBT, "both kinds of in-doubt transaction occurred"
    assert 0 < report["coordinator_serving_s"] <= report["resolved_s"]
