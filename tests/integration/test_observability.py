"""Health, reflection, metrics and trace context on real daemons (a two-region cluster of its
own, mutual TLS on every hop, each daemon writing its spans to a file)."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from tests.support import transfer_sql
from twopc.client import Client, RetryPolicy, TransactionAborted
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.mariadb import AGENT_USER
from twopc.testing.playground.tls import CLIENT, OTHER_APP
from twopc.txid import is_txid

REGIONS = ("eu", "us")
COORDINATOR = "twopc.v1.Coordinator"
PARTICIPANT = "twopc.v1.Participant"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("observed")
    cluster = Cluster.create(
        directory,
        REGIONS,
        coordinator_settings={
            "recovery_interval_s": 0.5,
            "trace_file": str(directory / "coordinator-spans.jsonl"),
        },
        agent_settings={
            "health_check_interval_s": 0.1,
            "safety_check_interval_s": 0.2,
            "pool_size": 4,
        },
    )
    for region in REGIONS:  # each agent its own span file
        config = Path(cluster.components[f"agent-{region}"].cwd) / "agent.toml"
        spans = directory / f"agent-{region}-spans.jsonl"
        config.write_text(config.read_text() + f'trace_file = "{spans}"\n')
    try:
        cluster.up()
        create_accounts(cluster, 10)
        yield cluster
    finally:
        cluster.down(timeout=10)


def _client(cluster: Cluster) -> Client:
    return cluster.client(retry_policy=RetryPolicy(attempts=10, deadline=10.0))


def _health(cluster: Cluster, name: str, service: str, identity: str = CLIENT) -> int:
    with cluster.channel(name, identity=identity) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def _scrape(cluster: Cluster, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample a daemon's metrics endpoint serves: (name, labels) -> value."""
    url = cluster.components[name].metrics_url
    assert url.startswith("http://127.0.0.1:"), url
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback http URL)
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- health and reflection ---------------------------------------------------------------------


def test_every_daemon_is_serving_after_start(cluster: Cluster) -> None:
    # The coordinator answers calls before its first recovery pass has finished, and is
    # SERVING only after it (tests/unit/test_observability.py checks the order).
    wait_until(
        lambda: _health(cluster, "coordinator", "") == SERVING, 10.0, "the coordinator SERVING"
    )
    for service in ("", COORDINATOR):
        assert _health(cluster, "coordinator", service) == SERVING
    for region in REGIONS:
        # Any identity the CA vouches for may ask (other-app may not call the Participant API).
        for service in ("", PARTICIPANT):
            assert _health(cluster, f"agent-{region}", service, OTHER_APP) == SERVING


def test_an_agent_is_not_serving_while_its_database_is_down(cluster: Cluster) -> None:
    agent = "agent-us"
    cluster.stop("mariadb-us")
    try:
        wait_until(lambda: _health(cluster, agent, "") == NOT_SERVING, 15.0, "agent-us NOT_SERVING")
        assert _health(cluster, agent, PARTICIPANT) == NOT_SERVING
        assert _value(_scrape(cluster, agent), "twopc_agent_database_up") == 0
        assert _health(cluster, "agent-eu", "") == SERVING
    finally:
        cluster.restart("mariadb-us")
    wait_until(lambda: _health(cluster, agent, "") == SERVING, 30.0, "agent-us SERVING again")
    assert _health(cluster, agent, PARTICIPANT) == SERVING
    assert _value(_scrape(cluster, agent), "twopc_agent_database_up") == 1


def test_an_agent_is_not_serving_while_a_safety_check_refuses(cluster: Cluster) -> None:
    """Its database user gains a right it must not hold (FILE): the agent refuses new
    branches, and says so in its health, until the right is revoked."""
    agent = "agent-eu"
    account = f"`{AGENT_USER}`@`127.0.0.1`"
    with cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute(f"GRANT FILE ON *.* TO {account}")
    try:
        wait_until(lambda: _health(cluster, agent, "") == NOT_SERVING, 15.0, "agent-eu NOT_SERVING")
        assert _health(cluster, agent, PARTICIPANT) == NOT_SERVING
        assert _value(_scrape(cluster, agent), "twopc_agent_accepting_branches") == 0
        assert _value(_scrape(cluster, agent), "twopc_agent_database_up") == 1
    finally:
        with cluster.mysql("eu") as conn, conn.cursor() as cursor:
            cursor.execute(f"REVOKE FILE ON *.* FROM {account}")
    wait_until(lambda: _health(cluster, agent, "") == SERVING, 15.0, "agent-eu SERVING again")
    assert _value(_scrape(cluster, agent), "twopc_agent_accepting_branches") == 1


def _listed_services(cluster: Cluster, name: str) -> set[str]:
    with cluster.channel(name, identity=OTHER_APP) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return {service.name for service in reply.list_services_response.service}


def test_reflection_lists_the_services(cluster: Cluster) -> None:
    common = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    admin = "twopc.v1.Admin"  # served with TLS (to admin_identities; listing it is harmless)
    assert _listed_services(cluster, "coordinator") == {COORDINATOR, admin, *common}
    assert _listed_services(cluster, "agent-eu") == {PARTICIPANT, *common}


# --- metrics -----------------------------------------------------------------------------------

_TXID_LIKE = re.compile(r"^c1\.|\.r-|^[0-9a-f]{32}$")


def test_metrics_count_what_the_transactions_did(cluster: Cluster) -> None:
    committed, aborted = 5, 2
    wait_until(
        lambda: _health(cluster, "coordinator", "") == SERVING, 10.0, "the coordinator SERVING"
    )
    before = {name: _scrape(cluster, name) for name in ("coordinator", "agent-eu", "agent-us")}
    with _client(cluster) as client:
        for i in range(committed):
            client.run({"eu": transfer_sql(-1, i), "us": transfer_sql(1, i)}, timeout=10)
        for _ in range(aborted):
            with pytest.raises(TransactionAborted):
                client.run(
                    {"eu": transfer_sql(-1, 0), "us": [("UPDATE no_such_table SET x = 1", [])]},
                    timeout=10,
                )

    def coordinator_delta(name: str, **labels: str) -> float:
        now = _scrape(cluster, "coordinator")
        return _value(now, name, **labels) - _value(before["coordinator"], name, **labels)

    # Counted when each transaction's fate is sealed: a committed one after its phase 2.
    wait_until(
        lambda: (
            coordinator_delta("twopc_coordinator_transactions_total", outcome="committed")
            >= committed
        ),
        10.0,
        "every commit counted",
    )
    after = _scrape(cluster, "coordinator")

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before["coordinator"], name, **labels)

    assert delta("twopc_coordinator_transactions_total", outcome="committed") == committed
    assert delta("twopc_coordinator_transactions_total", outcome="aborted") == aborted
    assert delta("twopc_coordinator_transactions_total", outcome="unknown") == 0
    assert delta("twopc_coordinator_commit_seconds_count") == committed + aborted
    for region in REGIONS:
        assert (
            delta("twopc_coordinator_prepare_seconds_count", participant=region)
            == committed + aborted
        )
    # One COMMIT record per committed transaction, made durable by some number of fsyncs.
    assert delta("twopc_decision_log_batch_commits_sum") == committed
    assert 1 <= delta("twopc_decision_log_fsync_seconds_count") <= committed
    wait_until(  # every recovery_interval_s (0.5 s here)
        lambda: coordinator_delta("twopc_coordinator_recovery_passes_total", result="clean") >= 1,
        10.0,
        "a clean recovery pass counted",
    )
    assert _value(after, "twopc_coordinator_in_doubt_transactions") == 0
    assert _value(after, "twopc_coordinator_serving") == 1

    eu_before, eu_after = before["agent-eu"], _scrape(cluster, "agent-eu")
    prepares = _value(eu_after, "twopc_agent_call_seconds_count", method="Prepare") - _value(
        eu_before, "twopc_agent_call_seconds_count", method="Prepare"
    )
    assert prepares == committed + aborted
    assert _value(eu_after, "twopc_agent_pool_capacity") == 4 + 32
    assert _value(eu_after, "twopc_agent_branches", state="prepared") == 0

    # No label anywhere names a transaction.
    for name in ("coordinator", "agent-eu", "agent-us"):
        for _, labels in _scrape(cluster, name):
            for key, value in labels:
                assert not is_txid(value), (name, key, value)
                assert not _TXID_LIKE.search(value), (name, key, value)


# --- trace context -----------------------------------------------------------------------------


def _spans(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_trace_context_reaches_the_coordinator_and_the_agent(cluster: Cluster) -> None:
    """The application's span is the parent of the coordinator's Execute span, which is the
    parent of the agent's Execute span: the traceparent went SDK -> coordinator -> agent."""
    tracer = TracerProvider().get_tracer("the-application")
    with _client(cluster) as client, tracer.start_as_current_span("transfer") as app:
        with client.transaction(timeout=10) as tx:
            tx.execute("eu", "UPDATE accounts SET balance = balance - %s WHERE id = %s", [1, 3])
            tx.execute("us", "UPDATE accounts SET balance = balance + %s WHERE id = %s", [1, 3])
        txid = tx.txid
    trace_id = f"{app.get_span_context().trace_id:032x}"
    app_span = f"{app.get_span_context().span_id:016x}"
    directory = cluster.directory

    def of_trace(path: Path, name: str) -> list[dict[str, object]]:
        return [s for s in _spans(path) if s["trace_id"] == trace_id and s["name"] == name]

    coordinator_spans = directory / "coordinator-spans.jsonl"
    wait_until(
        lambda: len(of_trace(coordinator_spans, "twopc.Coordinator/Execute")) == 2,
        10.0,
        "the coordinator's Execute spans",
    )
    executes = of_trace(coordinator_spans, "twopc.Coordinator/Execute")
    assert {s["parent_span_id"] for s in executes} == {app_span}
    assert {s["attributes"]["twopc.txid"] for s in executes} == {txid}  # type: ignore[index]
    (commit,) = of_trace(coordinator_spans, "twopc.Coordinator/Commit")
    assert commit["parent_span_id"] == app_span
    for region in REGIONS:
        agent_spans = directory / f"agent-{region}-spans.jsonl"
        wait_until(
            lambda p=agent_spans: of_trace(p, "twopc.Participant/Execute"),
            10.0,
            f"agent-{region}'s Execute span",
        )
        (execute,) = of_trace(agent_spans, "twopc.Participant/Execute")
        assert execute["parent_span_id"] in {s["span_id"] for s in executes}
        assert execute["attributes"] == {"twopc.txid": txid, "twopc.participant": region}
    # A one-shot transaction: its Prepare rides the pipeline stream, each call with its context.
    with _client(cluster) as client, tracer.start_as_current_span("transfer-2") as app:
        run = client.run({"eu": transfer_sql(-1, 4), "us": transfer_sql(1, 4)}, timeout=10)
    trace_id = f"{app.get_span_context().trace_id:032x}"
    wait_until(
        lambda: of_trace(coordinator_spans, "twopc.Coordinator/RunTransaction"),
        10.0,
        "the coordinator's RunTransaction span",
    )
    (run_span,) = of_trace(coordinator_spans, "twopc.Coordinator/RunTransaction")
    assert run_span["attributes"] == {"twopc.txid": run.txid}
    for region in REGIONS:
        agent_spans = directory / f"agent-{region}-spans.jsonl"
        wait_until(
            lambda p=agent_spans: of_trace(p, "twopc.Participant/Prepare"),
            10.0,
            f"agent-{region}'s Prepare span",
        )
        (prepare,) = of_trace(agent_spans, "twopc.Participant/Prepare")
        assert prepare["parent_span_id"] == run_span["span_id"]
        assert prepare["attributes"] == {"twopc.txid": run.txid, "twopc.participant": region}
    # Spans carry ids, never statements or values.
    for path in directory.glob("*-spans.jsonl"):
        assert "UPDATE" not in path.read_text()
