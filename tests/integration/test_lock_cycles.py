"""Lock cycles across regions, on the real cluster: found and broken in milliseconds, the victim's
client told with the retryable ``TransactionConflict``; local deadlocks and lock wait timeouts
come as the same class.

The one-shot cycle is made certain by a ``SELECT SLEEP`` before each transfer's second update:
T1 takes row a in eu and T2 row b in us at once (each prepares there), and 300 ms later T1 asks
for b in us while T2 asks for a in eu. Neither database sees a cycle: without the coordinator's
detector both would wait for the agents' lock wait timeout (5 s here) or their deadline.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from twopc.client import Client, ConflictRetry, RetryPolicy, TransactionConflict
from twopc.errors import TwopcError
from twopc.testing.playground.bank import TransferWorkload, create_accounts, total_balance
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.invariants import check_bank, prepared_branches, resolve_unknown

pytestmark = pytest.mark.timeout(60)

PAUSE_S = 0.3  # between each transfer's first update and its second
BREAK_BOUND_S = 1.0  # a cycle's victim hears of it within this, after the cycle formed


def balance(cluster: Cluster, region: str, account: int) -> int:
    with cluster.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT balance FROM accounts WHERE id = %s", [account])
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    """What ``work`` returned or raised, and how long it took."""
    started = time.monotonic()
    try:
        result: Any = work()
    except TwopcError as err:
        result = err
    return result, time.monotonic() - started


def cycle_of_transfers(client: Client) -> list[tuple[Any, float]]:
    """T1: eu#1 -5, (pause) us#2 +5; T2: us#2 -7, (pause) eu#1 +7, run at once."""
    sleep = f"SELECT SLEEP({PAUSE_S})"
    t1 = {
        "eu": [("UPDATE accounts SET balance = balance - 5 WHERE id = %s", [1])],
        "us": [sleep, ("UPDATE accounts SET balance = balance + 5 WHERE id = %s", [2])],
    }
    t2 = {
        "us": [("UPDATE accounts SET balance = balance - 7 WHERE id = %s", [2])],
        "eu": [sleep, ("UPDATE accounts SET balance = balance + 7 WHERE id = %s", [1])],
    }
    with ThreadPoolExecutor(2) as pool:
        futures: list[Future[tuple[Any, float]]] = [
            # Through phase 2: the tests read the balances afterwards.
            pool.submit(timed, lambda work=work: client.run(work, timeout=20, wait_for_phase2=True))
            for work in (t1, t2)
        ]
        return [f.result() for f in futures]


def metric(cluster: Cluster, component: str, name: str) -> float:
    """One unlabelled sample of a daemon's metrics (0 when it is not served)."""
    url = cluster.components[component].metrics_url
    assert url.startswith("http://127.0.0.1:"), url
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback http URL)
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return 0.0


DEADLOCK_METRICS = (
    "twopc_deadlock_cycles_total",
    "twopc_deadlock_victims_total",
    "twopc_deadlock_break_seconds_count",
)


def test_a_one_shot_cycle_across_regions_is_broken_at_once(
    live_cluster: Cluster, bank: int
) -> None:
    before = {name: metric(live_cluster, "coordinator", name) for name in DEADLOCK_METRICS}
    edges = "twopc_agent_lock_wait_edges_reported_total"
    holds = "twopc_agent_branch_lock_hold_seconds_count"
    agents_before = {
        (a, n): metric(live_cluster, a, n) for a in ("agent-eu", "agent-us") for n in (edges, holds)
    }
    with live_cluster.client() as client:
        (r1, s1), (r2, s2) = cycle_of_transfers(client)
    outcomes = [r1, r2]
    losers = [r for r in outcomes if isinstance(r, TwopcError)]
    assert len(losers) == 1, outcomes
    [loser] = losers
    assert isinstance(loser, TransactionConflict), loser
    assert "deadlock across participants" in loser.message
    loser_seconds = s1 if r1 is loser else s2
    # From the cycle's forming (after the pause) to the victim's answer.
    print(f"cycle broken: the victim answered {loser_seconds - PAUSE_S:.3f} s after it formed")
    assert loser_seconds < PAUSE_S + BREAK_BOUND_S
    assert max(s1, s2) < PAUSE_S + BREAK_BOUND_S + 1.0  # the survivor waited no timeout either
    # The winner's transfer alone is applied, on both sides.
    if r1 is loser:
        assert (balance(live_cluster, "eu", 1), balance(live_cluster, "us", 2)) == (1007, 993)
    else:
        assert (balance(live_cluster, "eu", 1), balance(live_cluster, "us", 2)) == (995, 1005)
    assert not any(prepared_branches(live_cluster).values())
    # One cycle, one victim, its break time measured; edges reported where the victim waited.
    after = {name: metric(live_cluster, "coordinator", name) for name in DEADLOCK_METRICS}
    assert {name: after[name] - before[name] for name in DEADLOCK_METRICS} == dict.fromkeys(
        DEADLOCK_METRICS, 1.0
    )
    grew = {
        key: metric(live_cluster, key[0], key[1]) - value for key, value in agents_before.items()
    }
    assert grew[("agent-eu", edges)] + grew[("agent-us", edges)] >= 1
    # The winner's two branches committed, each with its lock hold measured (phase 2 runs after
    # the answer: wait for it).
    wait_until(
        lambda: (
            sum(
                metric(live_cluster, a, holds) - agents_before[(a, holds)]
                for a in ("agent-eu", "agent-us")
            )
            >= 2
        ),
        5,
        "both branches of the winner committed",
    )


def test_with_conflict_retries_both_transfers_commit(live_cluster: Cluster, bank: int) -> None:
    retries = ConflictRetry(attempts=5, initial_backoff=0.05, max_backoff=0.5)
    with live_cluster.client(conflict_retries=retries) as client:
        outcomes = cycle_of_transfers(client)
    assert not [r for r, _ in outcomes if isinstance(r, TwopcError)], outcomes
    assert (balance(live_cluster, "eu", 1), balance(live_cluster, "us", 2)) == (1002, 998)


def test_an_interactive_cycle_across_regions_is_broken_at_once(
    live_cluster: Cluster, bank: int
) -> None:
    with live_cluster.client() as client:
        t1 = client.begin(timeout=20)
        t2 = client.begin(timeout=20)
        t1.execute("eu", "UPDATE accounts SET balance = balance - 5 WHERE id = %s", [3])
        t2.execute("us", "UPDATE accounts SET balance = balance - 7 WHERE id = %s", [4])
        second: dict[str, tuple[Any, float]] = {}

        def step(name: str, tx: Any, region: str, amount: int, account: int) -> None:
            sql = "UPDATE accounts SET balance = balance + %s WHERE id = %s"
            second[name] = timed(lambda: tx.execute(region, sql, [amount, account]))

        threads = [
            threading.Thread(target=step, args=("t1", t1, "us", 5, 4)),
            threading.Thread(target=step, args=("t2", t2, "eu", 7, 3)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        errors = {k: r for k, (r, _) in second.items() if isinstance(r, TwopcError)}
        assert len(errors) == 1, second
        [(name, error)] = errors.items()
        assert isinstance(error, TransactionConflict), error
        # t2 began later: it is the youngest, so the victim.
        assert name == "t2"
        print(f"interactive cycle broken in {second[name][1]:.3f} s")
        assert second[name][1] < BREAK_BOUND_S
        t1.commit()
    assert (balance(live_cluster, "eu", 3), balance(live_cluster, "us", 4)) == (995, 1005)
    assert not any(prepared_branches(live_cluster).values())


def test_a_local_deadlock_is_a_retryable_conflict(live_cluster: Cluster, bank: int) -> None:
    with live_cluster.client() as client:
        t1 = client.begin(timeout=20)
        t2 = client.begin(timeout=20)
        sql = "UPDATE accounts SET balance = balance + 1 WHERE id = %s"
        t1.execute("eu", sql, [5])
        t2.execute("eu", sql, [6])
        with ThreadPoolExecutor(2) as pool:
            f1 = pool.submit(timed, lambda: t1.execute("eu", sql, [6]))
            # t1 waits for row 6 before t2 asks for row 5: InnoDB then sees the cycle itself.
            deadline = time.monotonic() + 10
            while not _waiting(live_cluster, "eu") and time.monotonic() < deadline:
                # InnoDB refreshes INNODB_TRX only when nobody read it for 100 ms.
                time.sleep(0.12)
            f2 = pool.submit(timed, lambda: t2.execute("eu", sql, [5]))
            results = [f1.result()[0], f2.result()[0]]
        errors = [r for r in results if isinstance(r, TwopcError)]
        assert len(errors) == 1, results
        assert isinstance(errors[0], TransactionConflict)
        assert errors[0].mysql_errno == 1213
        (t1 if results[0] is not errors[0] else t2).commit()


def test_a_lock_wait_timeout_is_a_retryable_conflict(live_cluster: Cluster, bank: int) -> None:
    with live_cluster.mysql("us") as holder, holder.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("SELECT balance FROM accounts WHERE id = 7 FOR UPDATE")
        with live_cluster.client() as client, pytest.raises(TransactionConflict) as caught:
            client.run(
                {"us": [("UPDATE accounts SET balance = balance + 1 WHERE id = %s", [7])]},
                timeout=20,
            )
        cursor.execute("ROLLBACK")
    assert caught.value.mysql_errno == 1205


def _waiting(cluster: Cluster, region: str) -> bool:
    with cluster.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
        )
        row = cursor.fetchone()
        return bool(row and row[0])


def test_ordered_one_shot_transactions_form_no_cycle(live_cluster: Cluster, bank: int) -> None:
    """With ``one_shot_order = "ordered"`` the same two transfers take their locks in the same
    order (eu, then us): the second waits for the first in eu and both commit, no victim."""
    coordinator = live_cluster.component("coordinator")
    coordinator.env["TWOPC_COORDINATOR_ONE_SHOT_ORDER"] = "ordered"
    live_cluster.restart("coordinator")
    try:
        victims = metric(live_cluster, "coordinator", "twopc_deadlock_victims_total")
        with live_cluster.client() as client:
            outcomes = cycle_of_transfers(client)
        for result, _ in outcomes:
            assert not isinstance(result, TwopcError), result
        assert (balance(live_cluster, "eu", 1), balance(live_cluster, "us", 2)) == (1002, 998)
        assert metric(live_cluster, "coordinator", "twopc_deadlock_victims_total") == victims
        assert not any(prepared_branches(live_cluster).values())
    finally:
        coordinator.env.pop("TWOPC_COORDINATOR_ONE_SHOT_ORDER", None)
        live_cluster.restart("coordinator")


def labelled_metric(cluster: Cluster, component: str, name: str, **labels: str) -> float:
    url = cluster.components[component].metrics_url
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback http URL)
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_adaptive_order_turns_ordered_when_victims_are_many(live_cluster: Cluster) -> None:
    """``one_shot_order = "adaptive"``: hot transfers between 2 accounts per region from 16
    clients, prepared in parallel, lose many victims to cycles; once victims reach 5 % the
    coordinator prepares them in order, and from then on no cycle forms and nobody is a
    victim. Money is conserved and nothing is left prepared."""
    coordinator = live_cluster.component("coordinator")
    settings = {
        "TWOPC_COORDINATOR_ONE_SHOT_ORDER": "adaptive",
        "TWOPC_COORDINATOR_ONE_SHOT_ORDER_HOLD_MS": "120000",  # ordered for the whole test
    }
    coordinator.env.update(settings)
    live_cluster.restart("coordinator")
    prepares = "twopc_one_shot_prepares_total"

    def victims() -> float:
        return metric(live_cluster, "coordinator", "twopc_deadlock_victims_total")

    def ordered() -> float:
        return labelled_metric(live_cluster, "coordinator", prepares, order="ordered")

    try:
        total = create_accounts(live_cluster, 2)
        policy = RetryPolicy(attempts=10, initial_backoff=0.05, max_backoff=0.5, deadline=20.0)
        with live_cluster.client(retry_policy=policy) as client:
            workload = TransferWorkload(
                client,
                coordinator_id=live_cluster.coordinator_id,
                regions=("eu", "us"),
                accounts=2,
                seed=7,
                run_id="adaptive",
            )
            stop = threading.Event()
            runner = threading.Thread(
                target=workload.run, args=(10**6, 16), kwargs={"stop": stop}, daemon=True
            )
            runner.start()
            try:
                wait_until(lambda: ordered() >= 20, 40, "one-shot transfers prepared in order")
                before = victims()
                wait_until(lambda: ordered() >= 300, 40, "300 transfers prepared in order")
                after = victims()
            finally:
                stop.set()
                runner.join(timeout=30)
            wait_until(
                lambda: not any(prepared_branches(live_cluster).values()),
                20,
                "every prepared branch resolved",
                interval=0.05,
            )
            transfers = list(workload.transfers)
            resolved = resolve_unknown(client, transfers)
        assert before > 0, "no victim before the switch: parallel formed no cycle?"
        assert after == before, f"{after - before} victims while prepared in order"
        parallel = labelled_metric(live_cluster, "coordinator", prepares, order="parallel")
        assert before >= 0.05 * parallel
        switched = [
            line
            for line in (live_cluster.directory / "coordinator" / "coordinator.log")
            .read_text()
            .splitlines()
            if '"one_shot_prepares_ordered"' in line
        ]
        assert len(switched) == 1, switched
        verdicts = check_bank(
            live_cluster,
            transfers,
            expected_total=total,
            actual_total=total_balance(live_cluster),
            resolved=resolved,
        )
        assert not [str(v) for v in verdicts if not v.holds]
    finally:
        for name in settings:
            coordinator.env.pop(name, None)
        live_cluster.restart("coordinator")
