"""The plots are optional: without matplotlib, ``twopc chaos`` and ``twopc bench`` skip them with a
warning, and their exit status comes from what they checked alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from twopc.testing.bench.runner import write_report
from twopc.testing.chaos.report import ChaosResult
from twopc.testing.chaos.runner import finish
from twopc.testing.playground.invariants import Verdict


@pytest.fixture
def without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import matplotlib`` raises ImportError, as where it is not installed."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401, PLC0415


def chaos_result(*, holds: bool) -> ChaosResult:
    return ChaosResult(
        seed=7,
        duration=2.0,
        regions=["eu", "us"],
        transfers=[],
        faults=[],
        resolved={},
        verdicts=[Verdict("I1 atomicity", holds, "checked")],
        quiescence_s=0.1,
        began_at=0.0,
    )


@pytest.mark.usefixtures("without_matplotlib")
@pytest.mark.parametrize(("holds", "status"), [(True, 0), (False, 1)])
def test_chaos_without_matplotlib_exits_by_the_invariants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], holds: bool, status: int
) -> None:
    report, timeline = tmp_path / "chaos-report.json", tmp_path / "chaos-timeline.png"
    assert finish(chaos_result(holds=holds), report, timeline) == status
    assert json.loads(report.read_text())["ok"] is holds
    assert not timeline.exists()
    assert "warning: no timeline drawn: matplotlib is not installed" in capsys.readouterr().out


def test_chaos_with_matplotlib_draws_the_timeline(tmp_path: Path) -> None:
    timeline = tmp_path / "chaos-timeline.png"
    assert finish(chaos_result(holds=True), tmp_path / "report.json", timeline) == 0
    assert timeline.read_bytes().startswith(b"\x89PNG")


def bench_data() -> dict[str, object]:
    return {
        "started_at": "2026-12-06T00:00:00+00:00",
        "settings": {"duration_s": 1.0, "warmup_s": 0.5, "wait_phase2": False},
        "complete": True,
        "cells": [],
    }


@pytest.mark.usefixtures("without_matplotlib")
def test_bench_without_matplotlib_writes_its_report_and_no_plot(tmp_path: Path) -> None:
    json_path, table_path, plot_path = write_report(bench_data(), tmp_path)
    assert json.loads(json_path.read_text())["complete"] is True
    assert table_path.exists()
    assert plot_path is None
    assert not (tmp_path / "bench.png").exists()


def test_bench_with_matplotlib_draws_the_plot(tmp_path: Path) -> None:
    _, _, plot_path = write_report(bench_data(), tmp_path)
    assert plot_path is not None
    assert plot_path.read_bytes().startswith(b"\x89PNG")
