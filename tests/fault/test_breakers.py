"""The coordinator's circuit breaker per participant, against real processes: a SIGKILLed agent's
breaker opens, new transactions touching it are refused at once while the others commit, and it
closes again once the agent is back; phase 2 of a decided commit is never held by it."""

from __future__ import annotations

import signal
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import balance, markers, transfer_sql
from twopc.api import chaos_pb2 as cpb
from twopc.api import chaos_pb2_grpc as cpb_grpc
from twopc.client import Client, RetryPolicy, TwopcError
from twopc.errors import CircuitOpen
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.tls import ADMIN

RPC_TIMEOUT_S = 2.0
# The coordinator waits for an agent's channel to be ready for as long as the transaction's
# timeout: a transaction touching a dead agent, its breaker closed, fails after that long.
TX_TIMEOUT_S = 1.5
# Long enough for the refusals below to fit in one open period (each probe let through after
# it pays TX_TIMEOUT_S while the agent is still down).
OPEN_MS = 3000
BREAKER = {"breaker_failures": 2, "breaker_window_ms": 10_000, "breaker_open_ms": OPEN_MS}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.create(
        tmp_path_factory.mktemp("breakers") / "cluster",
        ["eu", "us"],
        coordinator_settings={
            "recovery_interval_s": 0.5,
            "reaper_interval_s": 0.1,
            "rpc_timeout_s": RPC_TIMEOUT_S,
            "admin_failpoints": True,
            **BREAKER,
        },
        agent_settings={"reaper_interval_s": 0.1, "pool_size": 4},
    )
    try:
        cluster.up()
        create_accounts(cluster, 2)
        yield cluster
    finally:
        cluster.down(timeout=10)


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    """A client that does not retry: each call is one request, timed as such. The agent a test
    killed runs again after it (when the test failed before restarting it)."""
    with cluster.client(retry_policy=RetryPolicy(attempts=1)) as c:
        yield c
    set_failpoint(cluster, "coordinator.after_commit_record", "")
    if not cluster.component("agent-us").alive():
        cluster.restart("agent-us")


def transfer(client: Client, amount: int = 1, **kwargs: object) -> str:
    result = client.run(
        {"eu": transfer_sql(-amount, 1), "us": transfer_sql(amount, 1)},
        timeout=TX_TIMEOUT_S,
        **kwargs,  # type: ignore[arg-type]
    )
    return result.txid


def samples(cluster: Cluster, name: str) -> dict[str, float]:
    """The coordinator's samples of ``name``, by their participant label."""
    url = cluster.component("coordinator").metrics_url
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback http URL)
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get("participant", "") + "/" + sample.labels.get("to", "")
                found[key.rstrip("/")] = sample.value
    return found


def breaker_of(cluster: Cluster, participant: str) -> float:
    return samples(cluster, "twopc_breaker_state")[participant]


def set_failpoint(cluster: Cluster, name: str, spec: str) -> None:
    with cluster.channel("coordinator", identity=ADMIN) as channel:
        cpb_grpc.FailpointsStub(channel).Set(
            cpb.SetFailpointRequest(name=name, spec=spec), timeout=5
        )


def fired(cluster: Cluster, name: str) -> int:
    with cluster.channel("coordinator", identity=ADMIN) as channel:
        listed = cpb_grpc.FailpointsStub(channel).List(cpb.ListFailpointsRequest(), timeout=5)
    return sum(p.fired for p in listed.failpoints if p.name == name)


def _closed_line(line: str) -> bool:
    return '"breaker_moved"' in line and '"us"' in line and '"to": "closed"' in line


def refused(client: Client) -> bool:
    """Tries a transfer: True when the breaker refused it, False when it committed."""
    try:
        transfer(client)
    except CircuitOpen:
        return True
    except TwopcError:
        return False  # failed the slow way: the breaker is not open (yet)
    return False


def committed(client: Client) -> bool:
    try:
        transfer(client)
    except TwopcError:
        return False
    return True


@pytest.mark.timeout(90)
def test_a_killed_agent_is_refused_fast_and_its_breaker_closes_once_it_is_back(
    cluster: Cluster, client: Client
) -> None:
    transfer(client)  # every channel is up
    assert breaker_of(cluster, "us") == 0
    refusals_before = samples(cluster, "twopc_breaker_fast_failures_total").get("us", 0.0)

    cluster.kill("agent-us", signal.SIGKILL)
    # Each transfer's prepare on us waits TX_TIMEOUT_S for the agent and fails: after 2 in a
    # row the breaker opens.
    slow = time.perf_counter()
    wait_until(lambda: refused(client), 15, "a transfer touching us refused by its breaker")
    print(f"2 transfers failing the slow way, then a refusal: {time.perf_counter() - slow:.2f} s")
    assert breaker_of(cluster, "us") in (1, 2)  # open, or half open with its probe out

    took = []
    for _ in range(5):
        started = time.perf_counter()
        with pytest.raises(CircuitOpen) as refusal:
            transfer(client)
        took.append(time.perf_counter() - started)
    message = refusal.value.message
    assert "participant 'us' is failing" in message
    assert f"breaker_open_ms = {OPEN_MS}" in message
    assert "after 2 failures in a row within 10000 ms (last failure: Prepare: " in message
    median_ms = statistics.median(took) * 1000
    print(f"refused transfer, client to error: median {median_ms:.1f} ms of {len(took)}")
    assert median_ms < 50, took  # over loopback and TLS, the whole round trip
    assert max(took) < RPC_TIMEOUT_S / 10, took
    fast = samples(cluster, "twopc_breaker_fast_failures_total")["us"] - refusals_before
    assert fast >= 6
    # Transactions touching only eu go on.
    client.run({"eu": transfer_sql(1, 0)}, timeout=TX_TIMEOUT_S)

    cluster.restart("agent-us")
    wait_until(lambda: committed(client), 15, "a transfer touching us committed again")
    assert breaker_of(cluster, "us") == 0
    moves = samples(cluster, "twopc_breaker_transitions_total")
    assert moves.get("us/open", 0) >= 1
    assert moves.get("us/half_open", 0) >= 1
    assert moves.get("us/closed", 0) >= 1
    log = cluster.component("coordinator").log
    with open(log) as lines:
        moved = [line for line in lines if '"breaker_moved"' in line and '"us"' in line]
    assert '"to": "open"' in moved[0], moved
    # After breaker_open_ms a probe went through to the agent, back now, and closed it.
    assert '"from": "half_open"' in moved[-1], moved
    assert '"to": "closed"' in moved[-1], moved
    assert "the agent answered Prepare" in moved[-1], moved


@pytest.mark.timeout(90)
def test_phase2_of_a_decided_commit_is_not_held_by_the_open_breaker(
    cluster: Cluster, client: Client
) -> None:
    wait_until(lambda: committed(client), 15, "a transfer touching us committing")
    eu_before, us_before = balance(cluster, "eu", 1), balance(cluster, "us", 1)
    point = "coordinator.after_commit_record"
    paused = fired(cluster, point)
    set_failpoint(cluster, point, "1*pause")
    outcome: list[str] = []
    thread = threading.Thread(
        target=lambda: outcome.append(transfer(client, 10, request_id="breaker-phase2"))
    )
    thread.start()
    try:
        wait_until(lambda: fired(cluster, point) > paused, 10, "the COMMIT record written")
        cluster.kill("agent-us", signal.SIGKILL)
    finally:
        set_failpoint(cluster, point, "")  # phase 2 goes on, to an agent that is gone
    thread.join(timeout=10)
    txid = outcome[0]
    wait_until(lambda: refused(client), 15, "us's breaker open")
    assert markers(cluster, txid) == {"eu"}

    with open(cluster.component("coordinator").log) as lines:
        closes_before = sum(1 for line in lines if _closed_line(line))
    cluster.restart("agent-us")
    # Recovery drives the decided commit to us while the breaker is still open (nothing asked
    # it since), and that answer is what closes it.
    wait_until(lambda: markers(cluster, txid) == {"eu", "us"}, 15, "phase 2 done on us")
    closes: list[str] = []

    def closed() -> bool:
        with open(cluster.component("coordinator").log) as lines:
            closes[:] = [line for line in lines if _closed_line(line)][closes_before:]
        return bool(closes)

    wait_until(closed, 10, "us's breaker closed")
    assert '"from": "open"' in closes[0], closes[0]
    assert "the agent answered Commit (phase 2)" in closes[0], closes[0]
    assert balance(cluster, "eu", 1) == eu_before - 10
    assert balance(cluster, "us", 1) == us_before + 10
    wait_until(lambda: committed(client), 15, "a transfer touching us committed again")
