"""``twopc bench-log`` runs end to end on the session's stores and writes its table."""

from __future__ import annotations

from pathlib import Path

from tests.sql_stores import Stores, rows
from twopc.testing.bench.log_stores import HEADER, main


def test_bench_log_prints_one_row_per_store_and_writer_count(
    tmp_path: Path, sql_stores: Stores
) -> None:
    output = tmp_path / "out" / "results.md"
    code = main(
        [
            "--count=40",
            "--writers=1,4",
            "--max-seconds=20",
            f"--directory={tmp_path}",
            f"--mariadb-url={sql_stores.new_database('mariadb')}",
            f"--postgres-url={sql_stores.new_database('postgresql')}",
            f"--output={output}",
        ]
    )
    assert code == 0
    text = output.read_text()
    assert HEADER in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(r.split("|")[1].strip(), int(r.split("|")[2])) for r in rows] == [
        (store, writers) for writers in (1, 4) for store in ("file", "mariadb", "postgresql")
    ]
    assert all(int(r.split("|")[3].split()[0]) == 40 for r in rows)  # every run finished


def test_bench_log_fenced_writes_under_a_lease(tmp_path: Path, sql_stores: Stores) -> None:
    output = tmp_path / "results.md"
    mariadb = sql_stores.new_database("mariadb")
    code = main(
        [
            "--count=20",
            "--writers=2",
            "--stores=mariadb",
            "--fenced",
            f"--directory={tmp_path}",
            f"--mariadb-url={mariadb}",
            f"--output={output}",
        ]
    )
    assert code == 0
    assert "SQL logs fenced on a lease" in output.read_text()
    assert rows(mariadb, "SELECT coordinator_id, holder, epoch FROM twopc_leases") == [
        ("bench2", "twopc-bench-log", 1)
    ]
