"""Rate limits per identity and shedding under overload, on a real coordinator, agents and
MariaDB servers (two regions, mutual TLS):

- the attacker: ``client`` (rate limit 4 per second, burst 4) floods the coordinator from four
  threads; it gets ResourceExhausted naming its identity and the setting, with a retry-after,
  and nothing of a refused transaction is applied, while ``other-app`` (no limit) commits every
  one of its transactions promptly;
- shedding: with ``admission_max_in_flight`` transactions begun and undecided, a new Begin and
  a new RunTransaction wait ``admission_queue_ms`` and are shed (ResourceExhausted, "shedding
  new transactions", a retry-after), while every Execute and Commit of the admitted ones goes
  through; once they are decided new transactions are admitted again.

Both refusals are counted in the coordinator's metrics, by reason. Outcomes are checked on
MariaDB.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support import balance
from twopc import Client, ResourceExhausted, RetryPolicy, TransactionState
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.tls import CLIENT, OTHER_APP

pytestmark = pytest.mark.timeout(90)

RATE = 4  # the attacker's new transactions per second, and its burst
MAX_IN_FLIGHT = 8
QUEUE_MS = 200
CREDIT = "UPDATE accounts SET balance = balance + 1 WHERE id = %s"
ONCE = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.create(
        tmp_path_factory.mktemp("admission"),
        ["eu", "us"],
        coordinator_settings={
            "rate_limit_burst": RATE,
            "admission_max_in_flight": MAX_IN_FLIGHT,
            "admission_queue_ms": QUEUE_MS,
        },
        agent_settings={"pool_size": 16},
    )
    # A mapping, as an operator writes it in the environment.
    cluster.components["coordinator"].env["TWOPC_COORDINATOR_RATE_LIMITS"] = f"{CLIENT}={RATE}"
    cluster.save()
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(timeout=10)


def refused_total(cluster: Cluster, reason: str) -> float:
    url = cluster.components["coordinator"].metrics_url
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback http URL)
        text = response.read().decode()
    found = re.search(rf'^twopc_coordinator_refused_total{{reason="{reason}"}} (\S+)$', text, re.M)
    assert found is not None, f"no refused_total for {reason}"
    return float(found.group(1))


def test_an_identity_over_its_rate_cannot_starve_another(cluster: Cluster) -> None:
    create_accounts(cluster, 10)
    before = refused_total(cluster, "rate_limit")
    stop = threading.Event()
    committed: list[str] = []
    refusals: list[ResourceExhausted] = []

    def flood(attacker: Client) -> None:
        while not stop.is_set():
            try:
                committed.append(attacker.run({"eu": [(CREDIT, [1])]}, timeout=5.0).txid)
            except ResourceExhausted as err:
                refusals.append(err)

    # Every refused request sent (a client that ignores the retry-after), from four threads.
    with cluster.client(CLIENT, retry_policy=ONCE, honor_retry_after=False) as attacker:
        threads = [threading.Thread(target=flood, args=(attacker,)) for _ in range(4)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            slowest = 0.0
            with cluster.client(OTHER_APP, retry_policy=ONCE) as victim:
                victims = 0
                while victims < 10 or time.monotonic() - began < 1.5:  # tokens come back
                    victims += 1
                    started = time.monotonic()
                    result = victim.run({"us": [(CREDIT, [2])]}, timeout=5.0)
                    slowest = max(slowest, time.monotonic() - started)
                    assert result.state in (TransactionState.COMMITTING, TransactionState.COMMITTED)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        elapsed = time.monotonic() - began
    assert slowest < 2.0, f"other-app waited {slowest:.2f} s for a transaction"
    assert refusals, "the attacker was never refused"
    assert len(committed) <= RATE + RATE * elapsed + 1, (len(committed), elapsed)
    for err in refusals:
        assert err.retry_after_s > 0
        assert err.message.startswith(
            f"rate limit of identity '{CLIENT}': over {RATE} new transactions per second "
            f"(its entry in rate_limits = {RATE}, burst {RATE}); retry after "
        ), err.message
    # Nothing of a refused transaction was applied; every victim's transaction was.
    assert balance(cluster, "eu", 1) == 1000 + len(committed)
    assert balance(cluster, "us", 2) == 1000 + victims
    assert refused_total(cluster, "rate_limit") - before == len(refusals)


def test_shedding_refuses_new_transactions_only(cluster: Cluster) -> None:
    create_accounts(cluster, 10)
    before = refused_total(cluster, "overload")
    with (
        cluster.client(OTHER_APP, retry_policy=ONCE) as admitted_client,
        cluster.client(OTHER_APP, retry_policy=ONCE, honor_retry_after=False) as newcomer,
    ):
        admitted = [admitted_client.begin(timeout=30.0) for _ in range(MAX_IN_FLIGHT)]
        for account, tx in enumerate(admitted):  # accounts 0-7, one each: no lock waits
            tx.execute("eu", CREDIT, [account])
        for new in (
            lambda: newcomer.begin(timeout=5.0),
            lambda: newcomer.run({"eu": [(CREDIT, [9])]}, timeout=5.0),
        ):
            started = time.monotonic()
            with pytest.raises(ResourceExhausted) as shed:
                new()
            assert time.monotonic() - started >= QUEUE_MS / 1000 * 0.9  # it waited in the queue
            assert shed.value.retry_after_s > 0
            assert shed.value.message.startswith(
                f"coordinator overloaded, shedding new transactions: {MAX_IN_FLIGHT} begun and "
                f"undecided, 0 waiting (admission_max_in_flight = {MAX_IN_FLIGHT}, "
                f"admission_queue_ms = {QUEUE_MS}); retry after "
            ), shed.value.message
        # The admitted transactions' calls are never shed.
        for account, tx in enumerate(admitted):
            tx.execute("us", CREDIT, [account])
            assert tx.commit() in (TransactionState.COMMITTING, TransactionState.COMMITTED)
            info = admitted_client.get_transaction(tx.txid)
            assert info.txid == tx.txid
        # Decided, they hold no slot: new transactions are admitted again.
        newcomer.run({"eu": [(CREDIT, [9])]}, timeout=5.0)
    for account in range(MAX_IN_FLIGHT):
        assert (balance(cluster, "eu", account), balance(cluster, "us", account)) == (1001, 1001)
    assert balance(cluster, "eu", 9) == 1000 + 1  # the shed one applied nothing
    assert refused_total(cluster, "overload") - before == 2
