"""A throwaway MariaDB server: start, answer, crash, restart from its command line, stop.

Each test starts real ``mariadbd`` processes in ``tmp_path``; the fixture stops them all. Every wait
is on a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from twopc.testing.playground.mariadb import (
    MariaDBBinaries,
    MariaDBInstance,
    MariaDBNotInstalled,
    MariaDBNotRunning,
    MariaDBStartFailed,
    find_binaries,
    start_all,
)

pytestmark = pytest.mark.integration

MakeInstance = Callable[..., MariaDBInstance]

# An XID as the coordinator writes it: bytes, sent as hex literals (XA RECOVER returns bytes).
GTRID = b"twopc-test-\x00\xff-gtrid"
BQUAL = b"eu"
FORMAT_ID = 7
XID = f"X'{GTRID.hex()}', X'{BQUAL.hex()}', {FORMAT_ID}"


@pytest.fixture
def make_instance(tmp_path: Path) -> Iterator[MakeInstance]:
    """Makes instances under tmp_path; stops every one of them afterwards."""
    made: list[MariaDBInstance] = []

    def make(name: str = "eu", **kwargs: Any) -> MariaDBInstance:
        instance = MariaDBInstance(name, tmp_path / name, **kwargs)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.stop(timeout=30)
        assert not instance.is_running()


def scalar(conn: pymysql.Connection, sql: str) -> object:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    assert row is not None
    return row[0]


def xa_recover(conn: pymysql.Connection) -> list[tuple[int, bytes]]:
    with conn.cursor() as cursor:
        cursor.execute("XA RECOVER")
        return [(int(fmt), bytes(data)) for fmt, _glen, _blen, data in cursor.fetchall()]


def test_starts_and_answers_with_durable_settings(make_instance: MakeInstance) -> None:
    db = make_instance()
    pid = db.start()

    assert db.is_running()
    assert db.pid() == pid
    assert db.address == f"127.0.0.1:{db.port}"
    with db.connect() as conn:
        assert scalar(conn, "SELECT 1") == 1
        assert scalar(conn, "SELECT @@innodb_flush_log_at_trx_commit") == 1
        assert scalar(conn, "SELECT @@log_bin") == 0
        assert scalar(conn, "SELECT @@performance_schema") == 0
        assert scalar(conn, "SELECT @@autocommit") == 1
        assert scalar(conn, "SELECT @@max_connections") == 500
        assert scalar(conn, "SELECT @@port") == db.port
        assert Path(str(scalar(conn, "SELECT @@datadir"))) == db.data_dir
    assert db.error_log.is_file()
    assert db.socket_path.is_socket()


def test_prepared_branch_survives_sigkill_and_restart_from_command_line(
    make_instance: MakeInstance,
) -> None:
    db = make_instance()
    db.start()
    owner = db.connect()
    with owner.cursor() as cursor:
        cursor.execute("CREATE DATABASE shop")
        cursor.execute("CREATE TABLE shop.stock (id INT PRIMARY KEY, qty INT) ENGINE=InnoDB")
        cursor.execute(f"XA START {XID}")
        cursor.execute("INSERT INTO shop.stock VALUES (1, 10)")
        cursor.execute(f"XA END {XID}")
        cursor.execute(f"XA PREPARE {XID}")

    db.kill(signal.SIGKILL)
    db.wait_stopped(timeout=10)
    assert not db.is_running()
    owner.close()  # the socket is dead already; close our side

    with (db.base_dir / "harness.out").open("ab") as output:
        harness = subprocess.Popen(
            db.command_line(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        db.wait_ready(timeout=30)
        assert db.pid() == harness.pid

        with db.connect() as conn:
            assert xa_recover(conn) == [(FORMAT_ID, GTRID + BQUAL)]
            assert scalar(conn, "SELECT COUNT(*) FROM shop.stock") == 0  # not committed yet
            with conn.cursor() as cursor:
                cursor.execute(f"XA COMMIT {XID}")
            assert xa_recover(conn) == []
            assert scalar(conn, "SELECT qty FROM shop.stock WHERE id = 1") == 10

        db.stop(timeout=30)
        assert harness.wait(timeout=10) == 0
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(timeout=10)


def test_stop_shuts_the_server_down(make_instance: MakeInstance) -> None:
    db = make_instance()
    db.start()

    db.stop()

    assert not db.is_running()
    assert db.pid() is None
    assert not db.pid_file.exists()  # a clean shutdown removes it
    with pytest.raises(pymysql.err.OperationalError):
        db.connect(connect_timeout=2)
    db.stop()  # stopping a stopped server does nothing
    with pytest.raises(MariaDBNotRunning):
        db.kill(signal.SIGTERM)


def test_sigstop_freezes_and_sigcont_resumes(make_instance: MakeInstance) -> None:
    db = make_instance()
    db.start()

    db.kill(signal.SIGSTOP)
    assert db.is_running()  # frozen, not gone
    with pytest.raises(pymysql.err.OperationalError):
        db.connect(connect_timeout=1, read_timeout=1)  # the kernel accepts; no greeting comes
    db.kill(signal.SIGCONT)
    db.wait_ready(timeout=10)

    db.kill(signal.SIGSTOP)
    started = time.monotonic()
    db.stop(timeout=30)  # continues it so that it sees the SIGTERM
    assert time.monotonic() - started < 20
    assert not db.is_running()


def test_second_start_reuses_the_data_directory(make_instance: MakeInstance) -> None:
    db = make_instance()
    db.start()
    with db.connect() as conn, conn.cursor() as cursor:
        cursor.execute("CREATE DATABASE kept")
        cursor.execute("CREATE TABLE kept.t (id INT PRIMARY KEY) ENGINE=InnoDB")
        cursor.execute("INSERT INTO kept.t VALUES (42)")
    db.stop()
    install_log_stamp = db.install_log.stat().st_mtime_ns

    started = time.monotonic()
    db.start()
    elapsed = time.monotonic() - started

    assert db.install_log.stat().st_mtime_ns == install_log_stamp  # no second mariadb-install-db
    assert elapsed < 10, f"second start took {elapsed:.2f} s"
    with db.connect("kept") as conn:
        assert scalar(conn, "SELECT id FROM t") == 42


def test_start_refuses_a_running_server(make_instance: MakeInstance) -> None:
    db = make_instance()
    pid = db.start()

    with pytest.raises(MariaDBStartFailed, match=f"already running \\(pid {pid}\\)"):
        db.start()


def test_three_start_in_parallel(make_instance: MakeInstance) -> None:
    regions = [make_instance(name) for name in ("eu", "us", "ap")]

    pids = start_all(regions)

    assert len(set(pids)) == 3
    assert len({db.port for db in regions}) == 3
    for db, pid in zip(regions, pids, strict=True):
        assert db.pid() == pid
        with db.connect() as conn:
            assert Path(str(scalar(conn, "SELECT @@datadir"))) == db.data_dir


def test_an_auto_picked_port_taken_meanwhile_is_replaced(make_instance: MakeInstance) -> None:
    db = make_instance()
    picked = db.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", picked))
        squatter.listen()

        db.start()

    assert db.port != picked
    with db.connect() as conn:
        assert scalar(conn, "SELECT @@port") == db.port


def test_a_server_that_dies_at_start_reports_its_error_log(make_instance: MakeInstance) -> None:
    db = make_instance(extra_args=["--no-such-option"])

    with pytest.raises(MariaDBStartFailed) as caught:
        db.start(timeout=30)

    message = str(caught.value)
    assert "exited with" in message
    assert str(db.error_log) in message
    assert "unknown option '--no-such-option'" in message
    assert not db.is_running()


def test_missing_binaries_name_the_setup_script(
    make_instance: MakeInstance, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    db = make_instance(
        binaries=MariaDBBinaries(
            mariadbd=missing / "mariadbd", install_db=missing / "mariadb-install-db"
        )
    )

    with pytest.raises(MariaDBNotInstalled, match=r"deploy/setup\.sh") as caught:
        db.start()

    assert str(missing / "mariadbd") in str(caught.value)
    assert not db.data_dir.exists()


def test_find_binaries_finds_executables() -> None:
    binaries = find_binaries(path="")  # only the usual directories

    binaries.check()
    assert binaries.mariadbd.name == "mariadbd"
    assert os.access(binaries.install_db, os.X_OK)
