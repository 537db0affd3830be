"""The foundation's acceptance run, done the way an outside harness would do it.

Only public surfaces: ``twopc playground`` started as a command, its JSON state file, the SDK
(``twopc.txid.Xid`` reads twopc's branches back from XA RECOVER), plain pymysql connections to the
databases, and real signals. Two hundred transfers between accounts in three regions run while
the coordinator is SIGKILLed at random moments and started again from the command line in the
state file. Within 10 s of the last restart nothing may stay prepared; every transfer the client
saw COMMITTED is applied on both sides, every one it saw ABORTED on neither, unknown ones resolve
by lookup to what was applied, and money is conserved.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from twopc.client import (
    Client,
    Outcome,
    OutcomeUnknown,
    RetryPolicy,
    TlsConfig,
    TransactionAborted,
    TwopcError,
)
from twopc.txid import Xid

TRANSFERS = 200
WORKERS = 8
KILLS = 5
ACCOUNTS = 20
QUIESCENCE_S = 10.0


def twopc(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "twopc.cli", *args],
        check=True,
        timeout=180,
        capture_output=True,
    )


@pytest.fixture
def spawned() -> list[subprocess.Popen[bytes]]:
    """Processes the harness started itself; reaped after the playground is down."""
    return []


@pytest.fixture
def playground(tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> Iterator[dict[str, Any]]:
    directory = tmp_path / "playground"
    twopc(
        "playground", "--dir", str(directory), "--regions", "eu,us,ap", "--detach", "--no-examples"
    )
    try:
        yield json.loads((directory / "state.json").read_text())
    finally:
        twopc("playground", "--dir", str(directory), "--down")
        for process in spawned:
            process.wait(timeout=30)


@contextlib.contextmanager
def database(state: dict[str, Any], region: str) -> Iterator[Any]:
    host, port = state["components"][f"mariadb-{region}"]["address"].rsplit(":", 1)
    conn = pymysql.connect(
        host=host, port=int(port), user="root", database=state["database"], autocommit=True
    )
    try:
        with conn.cursor() as cursor:
            yield cursor
    finally:
        conn.close()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


class CoordinatorKiller:
    """SIGKILLs the coordinator when the count of finished transfers reaches random thresholds,
    and starts it again from the state file's command line."""

    def __init__(
        self,
        component: dict[str, Any],
        thresholds: list[int],
        restarts: list[subprocess.Popen[bytes]],
    ) -> None:
        self.component = component
        self.pid: int = component["pid"]
        self.thresholds = sorted(thresholds)
        self.finished = 0
        self.changed = threading.Condition()
        self.restarts = restarts
        self.last_restart = time.monotonic()
        self.downtime: list[float] = []

    def transfer_done(self) -> None:
        with self.changed:
            self.finished += 1
            self.changed.notify_all()

    def run(self) -> None:
        for threshold in self.thresholds:
            with self.changed:
                if not self.changed.wait_for(lambda t=threshold: self.finished >= t, timeout=120):
                    return
            killed = time.monotonic()
            os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            with open(self.component["log"], "ab") as log:
                process = subprocess.Popen(
                    self.component["command"],
                    cwd=self.component["cwd"],
                    env={**os.environ, **self.component["env"]},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.restarts.append(process)
            self.pid = process.pid
            self.last_restart = time.monotonic()
            self.downtime.append(self.last_restart - killed)


Plan = tuple[str, str, int, str, int, int]  # request id, source region and id, target, amount


def seed_accounts(state: dict[str, Any]) -> int:
    for region in state["regions"]:
        with database(state, region) as cursor:
            cursor.execute("CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
            cursor.executemany(
                "INSERT INTO accounts VALUES (%s, %s)", [(i, 1000) for i in range(ACCOUNTS)]
            )
    return 1000 * ACCOUNTS * len(state["regions"])


def plan_transfers(regions: list[str], rng: random.Random) -> list[Plan]:
    plans = []
    for index in range(TRANSFERS):
        source, target = rng.sample(regions, 2)
        plans.append(
            (
                f"harness-{index}",
                source,
                rng.randrange(ACCOUNTS),
                target,
                rng.randrange(ACCOUNTS),
                rng.randint(1, 100),
            )
        )
    return plans


def run_transfers(client: Client, plans: list[Plan], killer: CoordinatorKiller) -> dict[str, str]:
    """Runs the transfers on WORKERS threads; returns what the client saw of each."""
    queue = list(plans)
    seen: dict[str, str] = {}
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                request_id, source, source_id, target, target_id, amount = queue.pop()
            try:
                client.run(
                    {
                        source: [
                            (
                                "UPDATE accounts SET balance = balance - %s WHERE id = %s",
                                [amount, source_id],
                            )
                        ],
                        target: [
                            (
                                "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                                [amount, target_id],
                            )
                        ],
                    },
                    timeout=5,
                    request_id=request_id,
                )
                outcome = "committed"
            except TransactionAborted:
                outcome = "aborted"
            except (OutcomeUnknown, TwopcError):
                outcome = "unknown"
            with lock:
                seen[request_id] = outcome
            killer.transfer_done()

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    return seen


def prepared(state: dict[str, Any]) -> list[str]:
    left = []
    for region in state["regions"]:
        with database(state, region) as cursor:
            cursor.execute("XA RECOVER")
            xids = (
                Xid.from_recover_row(int(format_id), int(gtrid_length), bytes(data))
                for format_id, gtrid_length, _bqual_length, data in cursor.fetchall()
            )
            left += [f"{region}:{xid.txid}" for xid in xids if xid is not None]
    return left


def applied_txids(state: dict[str, Any]) -> dict[str, set[str]]:
    applied = {}
    for region in state["regions"]:
        with database(state, region) as cursor:
            cursor.execute("SELECT gtrid FROM twopc_branch_marker")
            applied[region] = {bytes(r[0]).decode() for r in cursor.fetchall()}
    return applied


def total_balance(state: dict[str, Any]) -> int:
    total = 0
    for region in state["regions"]:
        with database(state, region) as cursor:
            cursor.execute("SELECT SUM(balance) FROM accounts")
            total += int(cursor.fetchone()[0])
    return total


def test_200_transfers_with_the_coordinator_killed_at_random_moments(
    playground: dict[str, Any], spawned: list[subprocess.Popen[bytes]]
) -> None:
    expected_total = seed_accounts(playground)
    rng = random.Random(20261129)
    coordinator = playground["components"]["coordinator"]
    killer = CoordinatorKiller(coordinator, rng.sample(range(10, TRANSFERS - 10), KILLS), spawned)
    plans = plan_transfers(playground["regions"], rng)
    policy = RetryPolicy(attempts=200, initial_backoff=0.02, max_backoff=0.3, deadline=30.0)
    # The client's certificate, as the state file names it (mutual TLS).
    files = playground["client_tls"]
    tls = TlsConfig(cert=Path(files["cert"]), key=Path(files["key"]), ca=Path(files["ca"]))
    with Client(coordinator["address"], tls=tls, retry_policy=policy, rpc_timeout=10) as client:
        chaos = threading.Thread(target=killer.run)
        chaos.start()
        started = time.monotonic()
        seen = run_transfers(client, plans, killer)
        elapsed = time.monotonic() - started
        chaos.join(timeout=60)
        assert len(seen) == TRANSFERS
        assert len(killer.downtime) == KILLS, "every kill happened during the run"

        while prepared(playground) and time.monotonic() < killer.last_restart + QUIESCENCE_S:
            time.sleep(0.05)
        quiet_after = time.monotonic() - killer.last_restart
        assert prepared(playground) == [], f"branches left {quiet_after:.1f} s after the restart"

        resolved = {}
        for request_id, outcome in seen.items():
            if outcome == "unknown":
                info = client.get_transaction(request_id=request_id)
                assert info.outcome in (Outcome.COMMITTED, Outcome.ABORTED), request_id
                resolved[request_id] = info.outcome.name.lower()

    applied = applied_txids(playground)
    for request_id, source, _, target, _, _ in plans:
        txid = f"{playground['coordinator_id']}.r-{request_id}"
        sides = {txid in applied[source], txid in applied[target]}
        assert len(sides) == 1, f"{request_id} applied on one side only"
        outcome = resolved.get(request_id, seen[request_id])
        assert sides == {outcome == "committed"}, f"{request_id}: client saw {seen[request_id]}"
    total = total_balance(playground)
    assert total == expected_total

    counts = Counter(seen.values())
    print(
        f"\n{TRANSFERS} transfers in {elapsed:.1f} s with {KILLS} coordinator SIGKILLs "
        f"(kill to restart: median {sorted(killer.downtime)[KILLS // 2]:.2f} s); "
        f"client saw {dict(counts)}; unknown resolved {dict(Counter(resolved.values()))}; "
        f"no prepared branch {quiet_after:.2f} s after the last restart; total {total} conserved"
    )
