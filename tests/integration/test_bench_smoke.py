"""A short `twopc bench` on a small proxied cluster: every system, twopc with and without TLS,
with and without an injected round trip, must commit, conserve the money and leave no XA branch
behind; at 0 ms no system's traffic crosses the proxy (its per-link byte counters stay at zero),
with a round trip each system's cross-region hops do; the contended workloads run, end by
themselves and conserve the money and the stock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from twopc.testing.bench.systems import BENCH_FORMAT_ID, SYSTEMS, TwopcPlaintext
from twopc.testing.playground.cluster import Cluster

RTTS = (0, 4)
CONCURRENCY = 2


@pytest.mark.timeout(200)
def test_short_bench_run_of_every_system(tmp_path: Path) -> None:
    directory, out = tmp_path / "cluster", tmp_path / "out"
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "twopc.testing.bench.runner",
                "--workloads=transfer2",
                "--systems=all",
                "--tls=on,off",
                f"--concurrency={CONCURRENCY}",
                f"--latency-ms={','.join(str(r) for r in RTTS)}",
                "--duration=1.2",
                "--warmup=0.3",
                "--accounts=200",
                f"--dir={directory}",
                f"--out={out}",
                "--keep",
            ],
            capture_output=True,
            text=True,
            timeout=170,
            check=False,
        )
        print(result.stdout[-4000:])
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        cluster = Cluster.load(directory)
        leftovers = {}
        for region in cluster.regions:
            with cluster.mysql(region) as conn, conn.cursor() as cursor:
                cursor.execute("XA RECOVER")
                leftovers[region] = [row for row in cursor.fetchall() if row[0] == BENCH_FORMAT_ID]
        assert leftovers == {r: [] for r in cluster.regions}, "direct XA left branches behind"
    finally:
        if (directory / "state.json").exists():
            Cluster.load(directory).down(timeout=10)

    report = json.loads((out / "bench.json").read_text())
    cells = {(c["rtt_ms"], c["system"]): c for c in report["cells"]}
    systems = [*SYSTEMS, TwopcPlaintext.name]
    assert set(cells) == {(rtt, system) for rtt in RTTS for system in systems}
    for (rtt, system), cell in cells.items():
        where = f"{system} at {rtt} ms"
        _assert_ran(cell, where)
        if system == TwopcPlaintext.name:  # twopc ÷ it: what TLS costs
            assert 0 < cell["fsyncs_per_commit"] <= 1, where
            assert cell["cpu_s_per_1k"]["coordinator"] > 0, where
            assert cell["twopc_ratio"]["tps"] is not None, where
        elif system == "twopc":
            assert 0 < cell["fsyncs_per_commit"] <= 1, where
            floor = report["latency_floor_ms"][str(rtt)]
            assert floor["total_ms"] >= floor["agents_ms"] >= rtt * 0.9, where
            assert cell["floor_ms"] == floor["total_ms"], where
            assert cell["floor_ratio"]["p50"] > 0.5, f"{where}: twopc beat its own floor?"
            assert cell["cpu_s_per_1k"]["coordinator"] > 0, where
            assert cell["peak_rss_mb"]["coordinator"] > 0, where
        else:
            assert cell["fsyncs_per_commit"] is None, where
            assert cell["cpu_s_per_1k"]["coordinator"] == 0, where
            assert cell["connections_opened"] <= CONCURRENCY * 2, f"{where}: reconnections"
            assert cell["twopc_ratio"]["tps"] is not None, where
    # The injected round trip slows the direct baselines down.
    assert cells[(4, "local")]["latency_ms"]["p50"] > cells[(0, "local")]["latency_ms"]["p50"]
    assert (out / "bench.md").read_text().count("| transfer2") == len(cells)
    summary = (out / "bench-summary.md").read_text()
    tls_table = summary.split("## twopc with and without mutual TLS", 1)[1].split("## Conten")[0]
    assert tls_table.count("| transfer2") == len(RTTS)
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def _assert_ran(cell: dict[str, Any], where: str) -> None:
    assert cell["concurrency"] == CONCURRENCY
    assert cell["tps"] > 0, where
    assert cell["latency_ms"]["p50"] > 0, where
    assert cell["check"]["ok"], f"{where}: money not conserved: {cell['check']}"
    assert cell["check"]["prepared_left"] == {}, where
    assert cell["cpu_s_per_1k"]["bench"] is not None, where
    assert cell["time_wait"]["new_in_window"] == 0, f"{where}: a connection per transaction?"
    _assert_paths(cell, where)


def _assert_paths(cell: dict[str, Any], where: str) -> None:
    """At 0 ms nothing crossed the proxy; with a round trip, the system's own hops did."""
    moved = cell["proxy_bytes"]
    assert moved, f"{where}: no proxy counters read"
    if cell["rtt_ms"] == 0:
        assert not any(moved.values()), f"{where}: traffic through the proxy at 0 ms: {moved}"
        assert "direct, no proxy" in cell["path"], where
        return
    assert "through the proxy" in cell["path"], where
    hop = "coordinator-agent-" if cell["system"].startswith("twopc") else "client-mariadb-"
    mine = {name: n for name, n in moved.items() if name.startswith(hop)}
    assert len(mine) == 2, where
    assert all(n > 1000 for n in mine.values()), f"{where}: {hop}* carried nothing: {moved}"


HOT_SYSTEMS = ("twopc", "twopc-ordered", "twopc-adaptive", "direct-xa", "sqla-twophase")


@pytest.mark.timeout(240)
def test_contended_workloads_run_end_and_conserve(tmp_path: Path) -> None:
    directory, out = tmp_path / "cluster", tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twopc.testing.bench.runner",
            "--workloads=transfer2-hot,flash-sale-2region",
            f"--systems={','.join(HOT_SYSTEMS)}",
            "--concurrency=4",
            "--latency-ms=0",  # the latency paths are the other smoke test's
            "--duration=1.5",
            "--warmup=0.3",
            "--accounts=100",
            "--hot-accounts=3",
            "--lock-wait-timeout=1",
            "--regions=eu,us",
            f"--dir={directory}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    cells = {(c["workload"], c["rtt_ms"], c["system"]): c for c in report["cells"]}
    assert set(cells) == {
        (w, rtt, s) for w in ("transfer2-hot", "flash-sale-2region") for rtt in (0,)
        for s in HOT_SYSTEMS
    }  # fmt: skip
    for (workload, rtt, system), cell in cells.items():
        where = f"{workload} {system} at {rtt} ms"
        if (workload, system) == ("transfer2-hot", "twopc"):
            # twopc sends both branches at once: two transfers can lock a hot row each in
            # different regions and wait on each other until the lock-wait timeout, so a short
            # window may hold no commit at all; it must still have run and ended.
            worked = cell["committed"] + cell["aborted"] + cell["stuck_at_end"]
            assert worked > 0, f"{where}: nothing ran"
        else:
            assert cell["committed"] > 0, where
        assert cell["check"]["ok"], f"{where}: not conserved: {cell['check']}"
        assert cell["check"]["prepared_left"] == {}, where
        assert cell["check"]["stragglers"] == 0, f"{where}: a worker did not end"
        _assert_paths(cell, where)
        if workload == "flash-sale-2region":
            assert cell["check"]["paid"] == 7 * cell["check"]["sold"] > 0, where
        for figure in ("deadlocks", "lock_wait_timeouts", "waited_out", "stuck_at_end"):
            assert cell[figure] >= 0, where
        if system.startswith("twopc"):  # read when served, None ("n/a") when not: never missing
            assert set(cell["contention"]) == {
                "deadlock_cycles", "deadlock_victims", "deadlock_break", "agent_lock_hold",
            }, where  # fmt: skip
        else:
            assert cell["contention"] == {}, where
        if system == "twopc-ordered":  # branches in one order: no lock cycle can form
            assert cell["contention"]["deadlock_cycles"] == 0, where
            assert cell["committed"] > 0, where
            assert cell["aborted"] == 0, where
    # The direct paths at 0 ms are the components' own addresses, as the state file has them.
    state = json.loads((directory / "state.json").read_text())
    own = {name: c["address"] for name, c in state["components"].items()}
    direct = report["paths"]["0"]
    for region in ("eu", "us"):
        assert f"{region} {own[f'agent-{region}']}" in direct["twopc"]
        assert f"{region} {own[f'mariadb-{region}']}" in direct["baselines"]
    summary = (out / "bench-summary.md").read_text()
    assert summary.split("## Contention", 1)[1].count("| transfer2-hot") == len(HOT_SYSTEMS)
    orders = summary.split("prepared in parallel and in order", 1)[1].split("## Contention")[0]
    assert orders.count("| transfer2-hot") == 1  # one row per round trip
    # Each twopc system ran on a coordinator started with its one-shot order.
    started = [
        json.loads(line)
        for line in (directory / "coordinator" / "coordinator.log").read_text().splitlines()
        if '"coordinator_listening"' in line
    ]
    assert {entry["one_shot_order"] for entry in started} == {"parallel", "ordered", "adaptive"}


def test_agent_io_micro_benchmark_runs_both_models_and_commits_every_branch(
    live_cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from twopc.testing.bench import agent_io  # noqa: PLC0415 (only this test needs it)

    host, port = live_cluster.component("mariadb-eu").address.rsplit(":", 1)
    agent_io.main(
        [f"--host={host}", f"--port={port}", "--branches=40", "--rounds=1", "--concurrency=4"]
    )
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines()[2:]] == ["thread", "loop"]
    with live_cluster.mysql("eu", database="twopc_agent_io_bench") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT (SELECT COUNT(*) FROM markers), (SELECT SUM(balance) FROM accounts)")
        assert cursor.fetchone() == (80, 80)
        cursor.execute("XA RECOVER")
        assert not [row for row in cursor.fetchall() if b"agent-io" in bytes(row[3])]
