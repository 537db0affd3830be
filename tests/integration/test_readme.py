"""The README's "Use it from Python" section, done as a new user does it.

The playground is started with the README's command in an empty directory, the README's Python
program is run unchanged (its text is taken from the README), then the README's ``twopc tx``
command. The effects are checked on the databases. ``.venv/bin/twopc`` is run as this Python's
``-m twopc.cli`` with this checkout first on the path (the shared virtual environment's
``twopc`` script may belong to another checkout). The program gets its client certificate the
way the README says: the ``export`` line the playground prints (``TWOPC_TLS_CERT``, ``..._KEY``,
``..._CA``, and ``TWOPC_COORDINATOR`` when port 7100 was taken here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest

from twopc.testing.playground.cluster import process_alive, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TWOPC = ".venv/bin/twopc"
START_DEADLINE_S = 180.0


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def command(line: str) -> list[str]:
    """A README command line as this test runs it."""
    words = line.split()
    assert words[0] == TWOPC, f"not a twopc command: {line!r}"
    return [sys.executable, "-m", "twopc.cli", *words[1:]]


def environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TWOPC_COORDINATOR", "PYTHONPATH") and not k.startswith("TWOPC_TLS_")
    }
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def exported(printed: list[str]) -> dict[str, str]:
    """The variables of the ``export`` line the playground printed."""
    lines = [line.strip() for line in printed if line.strip().startswith("export ")]
    assert len(lines) == 1, printed
    return dict(word.split("=", 1) for word in lines[0].split()[1:])


@dataclass
class Playground:
    process: subprocess.Popen[str]
    directory: Path
    output: list[str] = field(default_factory=list)
    up: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops everything"):
                self.up.set()
        self.up.set()  # it ended: nothing more will come

    @property
    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(
            (self.directory / ".twopc-playground" / "state.json").read_text()
        )
        return state


@pytest.fixture
def playground(tmp_path: Path) -> Iterator[Playground]:
    blocks = code_blocks(section("Use it from Python"), "sh")
    assert blocks[0].strip() == f"{TWOPC} playground", "the README starts it otherwise now"
    process = subprocess.Popen(
        command(blocks[0].strip()),
        cwd=tmp_path,
        env=environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = Playground(process, tmp_path)
    reader = threading.Thread(target=started.read, daemon=True)
    reader.start()
    try:
        assert started.up.wait(START_DEADLINE_S), "the playground did not come up"
        assert process.poll() is None, "\n".join(started.output)
        yield started
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # the README's Ctrl-C
        process.wait(timeout=120)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def query(state: dict[str, Any], region: str, sql: str) -> list[tuple[Any, ...]]:
    host, port = state["components"][f"mariadb-{region}"]["address"].rsplit(":", 1)
    conn = pymysql.connect(
        host=host, port=int(port), user="root", database=state["database"], autocommit=True
    )
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall())
    finally:
        conn.close()


def scalar(state: dict[str, Any], region: str, sql: str) -> Any:
    return query(state, region, sql)[0][0]


def test_the_readme_python_example_runs_against_the_readme_playground(
    playground: Playground, tmp_path: Path
) -> None:
    state = playground.state
    address = state["client_address"]
    printed = "\n".join(playground.output)
    assert f"clients connect to {address}" in printed
    assert "user root, no password, database twopc; example tables stock, orders, accounts" in (
        printed
    )
    for region in state["regions"]:
        database = state["components"][f"mariadb-{region}"]["address"]
        assert re.search(rf"^  {region}\s+{re.escape(database)}$", printed, re.MULTILINE)

    python = code_blocks(section("Use it from Python"), "python")
    (tmp_path / "example.py").write_text(python[0])
    variables = exported(playground.output)
    assert set(variables) >= {"TWOPC_TLS_CERT", "TWOPC_TLS_KEY", "TWOPC_TLS_CA"}
    assert variables.get("TWOPC_COORDINATOR", "127.0.0.1:7100") == address
    env = environment(**variables)

    def run_example() -> list[str]:
        done = subprocess.run(
            [sys.executable, "example.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.splitlines()

    first = run_example()
    assert len(first) == 2, first
    assert re.fullmatch(r"c1\.r-[0-9a-f]{32} (COMMITTING|COMMITTED)", first[0])
    assert re.fullmatch(r"c1\.r-transfer-8841 (COMMITTING|COMMITTED)", first[1])

    def applied(orders: int, stock: int) -> bool:
        return (
            scalar(state, "us", "SELECT COUNT(*) FROM orders WHERE sku = 'A1' AND customer = 42")
            == orders
            and scalar(state, "eu", "SELECT qty FROM stock WHERE sku = 'A1'") == stock
            and scalar(state, "eu", "SELECT balance FROM accounts WHERE id = 1") == 990
            and scalar(state, "us", "SELECT balance FROM accounts WHERE id = 2") == 1010
        )

    wait_until(lambda: applied(orders=1, stock=99), 30, "the example's commits applied")

    # Again: a new interactive transaction; the one-shot is not applied a second time.
    second = run_example()
    assert second[0].split()[0] != first[0].split()[0]
    assert re.fullmatch(r"c1\.r-transfer-8841 (COMMITTING|COMMITTED)", second[1])
    wait_until(lambda: applied(orders=2, stock=98), 30, "the second run applied once")

    lookups = code_blocks(section("Use it from Python"), "sh")[1:]
    assert [line.strip() for line in lookups] == [f"{TWOPC} tx --request-id transfer-8841"]
    done = subprocess.run(
        command(lookups[0].strip()),
        cwd=tmp_path,
        env=environment(),  # no TWOPC_COORDINATOR: it finds the playground's state file
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "outcome:      COMMITTED" in done.stdout

    # Ctrl-C stops everything.
    pids = [component["pid"] for component in state["components"].values()]
    playground.process.send_signal(signal.SIGINT)
    assert playground.process.wait(timeout=120) == 0
    wait_until(lambda: not any(process_alive(pid) for pid in pids), 30, "every part stopped")
    wait_until(lambda: "playground stopped" in playground.output, 10, "its last word")
