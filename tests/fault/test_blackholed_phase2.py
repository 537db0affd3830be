"""A link between an agent and its database that swallows bytes while the agent sends XA COMMIT.

(Chaos seed 107 found it: a blackhole on ``agent-ap-mariadb`` began as a branch committed. The
request was lost, the TCP connection stayed open, and the agent's thread waited for an answer for
``mysql_read_timeout_s``, 120 s, holding the prepared branch and its row locks; every transfer
touching those rows timed out until then. twopc's own commands now give up after
``mysql_command_timeout_s``: the session is dropped, its branch detached once the link carries
the FIN again, and phase 2 is retried from another connection.)
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import balance, markers, prepared, sleeping_sessions, transfer_sql
from twopc.api import chaos_pb2 as cpb
from twopc.api import chaos_pb2_grpc as cpb_grpc
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.chaos.proxy_service import ProxyControl
from twopc.testing.playground.cluster import PROXY, Cluster, wait_until
from twopc.testing.playground.tls import ADMIN, COORDINATOR

COMMAND_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.create(
        tmp_path_factory.mktemp("blackhole") / "cluster",
        ["eu", "us"],
        proxied=True,
        coordinator_settings={"recovery_interval_s": 0.5, "rpc_timeout_s": 2.0},
        agent_settings={
            "admin_failpoints": True,
            "mysql_command_timeout_s": COMMAND_TIMEOUT_S,
            "lock_wait_timeout_s": 1,
            # The marker GC runs all the time here, so that it meets every blackhole below
            # (and the reaper must keep working while it is stuck).
            "marker_gc_interval_s": 0.2,
        },
    )
    try:
        cluster.up()
        for region in cluster.regions:
            with cluster.mysql(region) as conn, conn.cursor() as cursor:
                cursor.execute(
                    "CREATE TABLE IF NOT EXISTS accounts (id INT PRIMARY KEY, "
                    "balance BIGINT NOT NULL)"
                )
                cursor.execute("REPLACE INTO accounts VALUES (1, 1000)")
        yield cluster
    finally:
        cluster.down(timeout=10)


def _arm(cluster: Cluster, daemon: str, name: str, spec: str) -> None:
    with cluster.channel(daemon, identity=ADMIN) as channel:
        cpb_grpc.FailpointsStub(channel).Set(
            cpb.SetFailpointRequest(name=name, spec=spec), timeout=5
        )


def _fired(cluster: Cluster, daemon: str, name: str) -> int:
    with cluster.channel(daemon, identity=ADMIN) as channel:
        listed = cpb_grpc.FailpointsStub(channel).List(cpb.ListFailpointsRequest(), timeout=5)
    return sum(p.fired for p in listed.failpoints if p.name == name)


def _phase2_retried(log: Path, txid: str, participant: str) -> bool:
    return any(
        '"phase2_retry"' in line
        and f'"{txid}"' in line
        and f'"participant": "{participant}"' in line
        for line in log.read_text().splitlines()
    )


def _execute(
    channel: grpc.Channel,
    txid: str,
    sequence: int,
    sql: str,
    *,
    timeout_ms: int = 0,
    continues: bool = False,
) -> None:
    """One statement into ``txid``'s branch on us, straight through the Participant API."""
    request = pb.BranchExecuteRequest(
        txid=txid,
        participant="us",
        sequence=sequence,
        timeout_ms=timeout_ms,
        continues=continues,
        statements=[pb.Statement(sql=sql)],
    )
    pb_grpc.ParticipantStub(channel).Execute(request, timeout=60)


def _active_branches(cluster: Cluster, region: str) -> int:
    with cluster.channel(f"agent-{region}", identity=COORDINATOR) as channel:
        info = pb_grpc.ParticipantStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
    return int(info.active_branches)


@pytest.mark.timeout(120)
def test_commit_lost_on_a_blackholed_link_frees_the_branch_in_seconds(cluster: Cluster) -> None:
    proxy = ProxyControl(cluster.component(PROXY).address, tls=cluster.proxy_tls())
    # us's agent holds its answer to PREPARE (the branch is prepared on the server) long enough
    # for the link to its database to turn into a blackhole before XA COMMIT goes out.
    _arm(cluster, "agent-us", "agent.after_prepare", "1*sleep(1500)")
    outcome: dict[str, object] = {}

    def transfer() -> None:
        with cluster.client() as client:
            result = client.run({"eu": transfer_sql(-10, 1), "us": transfer_sql(10, 1)})
            outcome["txid"] = result.txid

    worker = threading.Thread(target=transfer)
    worker.start()
    wait_until(lambda: _fired(cluster, "agent-us", "agent.after_prepare") == 1, 20, "prepared")
    proxy.set_fault("agent-us-mariadb", blackhole=True)
    blackholed = time.monotonic()
    worker.join(timeout=30)
    assert "txid" in outcome, "the client got no answer: the decision was durable, it must"
    txid = str(outcome["txid"])
    log = Path(cluster.component("coordinator").log)
    # The blackhole holds until phase 2 on us has failed once (XA COMMIT went into it).
    wait_until(lambda: _phase2_retried(log, txid, "us"), 30, "a failed phase-2 attempt on us")
    proxy.heal("agent-us-mariadb")
    healed = time.monotonic()

    wait_until(lambda: not prepared(cluster), 30, "no branch prepared anywhere")
    freed = time.monotonic()
    assert markers(cluster, txid) == {"eu", "us"}
    assert balance(cluster, "eu", 1) + balance(cluster, "us", 1) == 2000
    # Bounded by the command timeout and phase 2's retries, not by the 120 s read timeout.
    assert freed - healed < COMMAND_TIMEOUT_S + 10, (
        f"the branch was held {freed - blackholed:.1f} s ({freed - healed:.1f} s after the heal)"
    )
    with cluster.mysql("us") as conn, conn.cursor() as cursor:  # its row lock is gone too
        cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
        cursor.execute("UPDATE accounts SET balance = balance WHERE id = 1")


def _agent_events(log: Path, offset: int) -> list[dict[str, Any]]:
    """The events an agent logged (JSON lines) after byte ``offset`` of its log."""
    with log.open("rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line still being written, or not JSON
            events.append(json.loads(line))
    return events


def _logged(events: list[dict[str, Any]], event: str, txid: str, **fields: object) -> bool:
    return any(
        e.get("event") == event
        and e.get("txid") == txid
        and all(e.get(k) == v for k, v in fields.items())
        for e in events
    )


@pytest.mark.timeout(120)
def test_agent_stops_promptly_when_its_reaper_is_stuck_on_a_blackholed_link(
    cluster: Cluster,
) -> None:
    """(Chaos seed 105: an agent asked to restart took 26 s to exit. Its deadline reaper was
    stuck in KILL QUERY on a dead link, and closing the agent waited behind it in the same
    thread. Closing is now bounded.)

    Three branches on us, then its database link turns into a blackhole. The reaper meets
    ``running`` past its deadline: its KILL QUERY goes into the blackhole and gives up
    (``kill_failed``); on its next pass it shuts that session's socket
    (``branch_connection_severed``) and goes on to roll back ``idle``, which expired meanwhile,
    over that branch's own dead connection, where it hangs for the command timeout. The agent
    is asked to stop right then, with ``long`` still running on the dead link too."""
    proxy = ProxyControl(cluster.component(PROXY).address, tls=cluster.proxy_tls())
    agent = cluster.component("agent-us")
    log = Path(agent.log)
    logged_before = log.stat().st_size
    running, idle, long = (f"elsewhere.r-reaper-stuck-{n}" for n in ("running", "idle", "long"))

    def statement(txid: str, timeout_ms: int) -> None:
        with (
            cluster.channel(agent.address, identity=COORDINATOR) as channel,
            contextlib.suppress(grpc.RpcError),
        ):
            _execute(channel, txid, 1, "SELECT SLEEP(30)", timeout_ms=timeout_ms)

    callers = [
        threading.Thread(target=statement, args=(running, 2_000)),
        threading.Thread(target=statement, args=(long, 60_000)),
    ]
    for caller in callers:
        caller.start()
    try:
        wait_until(lambda: sleeping_sessions(cluster, "us") == 2, 10, "the statements running")
        with cluster.channel(agent.address, identity=COORDINATOR) as channel:
            # Expires after `running` (so the reaper's first pass, stuck in its KILL QUERY,
            # skips it) and before that KILL QUERY gives up (the command or the connect
            # timeout: 3 s at least).
            _execute(channel, idle, 1, "SELECT 1", timeout_ms=3_500)
        proxy.set_fault("agent-us-mariadb", blackhole=True)
        wait_until(
            lambda: _logged(
                _agent_events(log, logged_before), "branch_connection_severed", running
            ),
            60,
            "the reaper cutting the connection of the branch past its deadline",
        )
        asked = time.monotonic()
        agent.send(signal.SIGTERM)
        wait_until(lambda: not agent.alive(), 60, "the agent exiting after SIGTERM")
        took = time.monotonic() - asked
    finally:
        proxy.heal("agent-us-mariadb")
        for caller in callers:
            caller.join(timeout=60)
        if not agent.alive():
            cluster.restart("agent-us")
    assert took < 15, f"the agent took {took:.1f} s to exit"
    events = _agent_events(log, logged_before)
    stopping = next(i for i, e in enumerate(events) if e.get("event") == "agent_stopping")
    before_stop = events[:stopping]
    # The reaper did meet the dead link: its KILL QUERY there gave up, then it cut the socket
    # (no Rollback asked for `running`: only the reaper interrupts its statement).
    assert _logged(before_stop, "kill_failed", running, query_only=True), before_stop
    assert _logged(before_stop, "branch_connection_severed", running), before_stop
    # And it was stuck on it when the agent was asked to stop: its rollback of `idle`, begun in
    # the same pass as the cut, had not come back.
    assert not _logged(before_stop, "branch_rolled_back", idle), before_stop
    wait_until(lambda: sleeping_sessions(cluster, "us") == 0, 40, "the stuck sessions ended")


@pytest.mark.timeout(120)
def test_statement_lost_on_a_blackholed_link_ends_soon_after_the_deadline(
    cluster: Cluster,
) -> None:
    """(Chaos seed 107, on the final code: a statement sent into a blackhole left its thread
    waiting for mysql_read_timeout_s, 120 s; KILL QUERY could not help, the server had never
    seen the statement. The branch stayed active, held its session and delayed quiescence by
    57 s after the heal. Past its deadline the reaper now shuts the session's socket.)"""
    proxy = ProxyControl(cluster.component(PROXY).address, tls=cluster.proxy_tls())
    agent = cluster.component("agent-us")
    deadline_ms = 2_000
    with cluster.channel(agent.address, identity=COORDINATOR) as channel:
        _execute(channel, "elsewhere.r-lost-statement", 1, "SELECT 1", timeout_ms=deadline_ms)
        proxy.set_fault("agent-us-mariadb", blackhole=True)
        sent = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as failed:
                _execute(channel, "elsewhere.r-lost-statement", 2, "SELECT 2", continues=True)
            answered = time.monotonic() - sent
        finally:
            proxy.heal("agent-us-mariadb")
    assert failed.value.code() is not grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
    # The deadline, the reaper's grace, and one KILL QUERY attempt that the reaper makes first
    # over the dead link (a new connection: up to the 5 s connect timeout, then the 3 s command
    # timeout): far below the 120 s read timeout that held it before.
    assert answered < deadline_ms / 1000 + 2 + 5 + COMMAND_TIMEOUT_S + 5, f"after {answered:.1f} s"
    wait_until(lambda: _active_branches(cluster, "us") == 0, 10, "the branch gone from the agent")


@pytest.mark.timeout(120)
def test_marker_gc_on_a_blackholed_link_gives_up_after_the_command_timeout(
    cluster: Cluster,
) -> None:
    """(Chaos seed 107, after the Pipeline change: an agent restarted just before a blackhole on
    its database link sent its start-up marker GC into it. The DELETE waited for the 120 s read
    timeout, in the thread the deadline reaper shares, so branches lost on that link were not
    freed and quiescence came 28 s after the heal. The GC's statements now have the command
    timeout, and the GC has a thread of its own.)"""
    proxy = ProxyControl(cluster.component(PROXY).address, tls=cluster.proxy_tls())
    log = Path(cluster.component("agent-us").log)
    failures_before = log.read_text().count('"marker_gc_failed"')
    proxy.set_fault("agent-us-mariadb", blackhole=True)
    blackholed = time.monotonic()
    try:
        wait_until(
            lambda: log.read_text().count('"marker_gc_failed"') > failures_before,
            60,
            "the marker GC giving up on the dead link",
        )
        gave_up = time.monotonic() - blackholed
    finally:
        proxy.heal("agent-us-mariadb")
    # A new connection may wait out the 5 s connect timeout first: far below the 120 s read
    # timeout that held it before.
    assert gave_up < 5 + COMMAND_TIMEOUT_S + 5, f"the GC waited {gave_up:.1f} s"


@pytest.mark.timeout(120)
def test_a_rollback_that_waited_behind_a_lost_one_phase_commit_does_not_declare_it_rolled_back(
    cluster: Cluster,
) -> None:
    """(Chaos seed 107 on 3a804bf broke I6: a one-phase commit landed, its answer was lost on the
    agent's database link, and the agent could not reach the database to tell whether it had
    landed, so it gave the branch up as doubtful. A Rollback that was waiting for the branch then
    found it ACTIVE with no session and answered "rolled back" without asking the server.)"""
    proxy = ProxyControl(cluster.component(PROXY).address, tls=cluster.proxy_tls())
    agent = cluster.component("agent-us")
    txid = "elsewhere.r-lost-one-phase"
    before = balance(cluster, "us", 1)
    committed: dict[str, grpc.StatusCode] = {}
    with cluster.channel(agent.address, identity=COORDINATOR) as channel:
        participant = pb_grpc.ParticipantStub(channel)
        rollback = pb.BranchRollbackRequest(txid=txid, participant="us")
        _execute(
            channel,
            txid,
            1,
            "UPDATE accounts SET balance = balance + 5 WHERE id = 1",
            timeout_ms=60_000,
        )

        def commit_one_phase() -> None:
            try:
                participant.Commit(
                    pb.BranchCommitRequest(txid=txid, participant="us", one_phase=True), timeout=60
                )
            except grpc.RpcError as err:
                committed["code"] = err.code()
            else:
                committed["code"] = grpc.StatusCode.OK

        # Every chunk on the link waits 1.5 s in the proxy: the commit reaches the server, and
        # its answer is still in the proxy when the blackhole starts and drops it.
        proxy.set_fault("agent-us-mariadb", latency_ms=1_500)
        committer = threading.Thread(target=commit_one_phase)
        committer.start()
        try:
            wait_until(lambda: markers(cluster, txid) == {"us"}, 20, "the commit landed")
            proxy.set_fault("agent-us-mariadb", blackhole=True)
            # The committer holds the branch for the command timeout, then fails to reach the
            # database and gives the branch up; this Rollback waits for it meanwhile.
            with pytest.raises(grpc.RpcError) as while_cut:
                participant.Rollback(rollback, timeout=60)
            committer.join(timeout=60)
        finally:
            proxy.heal("agent-us-mariadb")
        assert while_cut.value.code() is grpc.StatusCode.UNAVAILABLE, while_cut.value
        assert committed == {"code": grpc.StatusCode.UNAVAILABLE}
        with pytest.raises(grpc.RpcError) as healed:
            participant.Rollback(rollback, timeout=60)
        assert healed.value.code() is grpc.StatusCode.FAILED_PRECONDITION, healed.value
        assert "committed" in str(healed.value.details())
        retried = participant.Commit(
            pb.BranchCommitRequest(txid=txid, participant="us", one_phase=True), timeout=60
        )
    assert retried.already_committed
    assert markers(cluster, txid) == {"us"}
    assert balance(cluster, "us", 1) == before + 5


@pytest.mark.timeout(120)
def test_an_agent_command_lost_on_a_blackholed_link_answers_unavailable(cluster: Cluster) -> None:
    """XA RECOVER on a pooled session whose link went dead gives up after the command timeout;
    the coordinator must be told to retry (UNAVAILABLE), not that the agent crashed (INTERNAL)."""
    proxy = ProxyControl(cluster.component(PROXY).address, tls=cluster.proxy_tls())
    agent = cluster.component("agent-us")
    log = Path(agent.log)
    crashes_before = log.read_text().count('"rpc_crashed"')
    with cluster.channel(agent.address, identity=COORDINATOR) as channel:
        participant = pb_grpc.ParticipantStub(channel)
        participant.Recover(pb.RecoverRequest(), timeout=30)  # leaves a session in the pool
        proxy.set_fault("agent-us-mariadb", blackhole=True)
        try:
            with pytest.raises(grpc.RpcError) as failed:
                participant.Recover(pb.RecoverRequest(), timeout=60)
        finally:
            proxy.heal("agent-us-mariadb")
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE, failed.value
        assert "us" in str(failed.value.details())
        assert log.read_text().count('"rpc_crashed"') == crashes_before
        participant.Recover(pb.RecoverRequest(), timeout=30)  # and it recovers after the heal
