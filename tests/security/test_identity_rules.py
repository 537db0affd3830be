"""Who may use which participants, and how much of them (issue 10, findings 3 and 5).

A cluster of this module's own (two regions, small pools and quotas), whose coordinator lists
``client`` and ``other-app`` (every participant) and ``limited`` (``eu`` only) in its
``identities`` setting; ``stranger`` has a certificate of the same CA and is not listed:

- an identity not listed may not use the client API at all, and a listed one may not touch a
  participant it is not given: PERMISSION_DENIED before any branch starts;
- one identity holding idle branches up to its ``max_sessions_per_identity`` on a region, or
  live transactions up to its ``max_active_per_identity``, leaves room for another identity,
  whose transactions still commit promptly;
- an interactive transaction that nobody calls for ``max_idle_ms`` is rolled back, its locks
  released.

Outcomes are checked on MariaDB (balances, locks, XA RECOVER) and on the agents.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from tests.security.hostile import branch_state, code, details, live_branches, refused, statement
from tests.support import balance, prepared
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.certs import CertificateAuthority
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.tls import CLIENT, OTHER_APP
from twopc.tls import TlsConfig
from twopc.values import to_values

LIMITED = "limited"  # may use eu only
STRANGER = "stranger"  # a certificate of the same CA, not in the identities setting
MAX_ACTIVE = 6
MAX_SESSIONS = 3
POOL = 3 + 2  # each agent's pool_size + pool_overflow: more than one identity's sessions
IDLE_MS = 6_000


@pytest.fixture(scope="module")
def ruled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, Path]]]:
    """The module's cluster, and the directory of each identity's certificate."""
    directory = tmp_path_factory.mktemp("identity-rules")
    cluster = Cluster.create(
        directory,
        ["eu", "us"],
        coordinator_settings={
            "recovery_interval_s": 0.5,
            "reaper_interval_s": 0.1,
            "rpc_timeout_s": 3.0,
            "max_active_per_identity": MAX_ACTIVE,
            "max_sessions_per_identity": MAX_SESSIONS,
            "max_idle_ms": IDLE_MS,
        },
        agent_settings={
            "reaper_interval_s": 0.1,
            "pool_size": 3,
            "pool_overflow": POOL - 3,
            "pool_checkout_timeout_s": 4.0,
            "lock_wait_timeout_s": 2,
        },
        identities={CLIENT: ["*"], OTHER_APP: ["*"], LIMITED: ["eu"]},
    )
    assert cluster.tls is not None
    authority = CertificateAuthority.load(cluster.tls.ca.parent)
    issued = {name: directory / "issued" / name for name in (LIMITED, STRANGER)}
    for name, where in issued.items():
        authority.issue(name, directory=where)
    try:
        cluster.up()
        yield cluster, issued
    finally:
        cluster.down(timeout=10)


@pytest.fixture
def cluster(ruled: tuple[Cluster, dict[str, Path]]) -> Iterator[Cluster]:
    """The module's cluster with fresh accounts (ids 0-9, balance 1000 in each region); no
    branch may be left behind by a test."""
    cluster = ruled[0]
    create_accounts(cluster, 10)
    yield cluster
    wait_until(
        lambda: not any(live_branches(cluster, r) for r in cluster.regions),
        15.0,
        "every branch finished after the test",
        interval=0.05,
    )
    assert not prepared(cluster)


@contextmanager
def coordinator(
    ruled: tuple[Cluster, dict[str, Path]], identity: str
) -> Iterator[pb_grpc.CoordinatorStub]:
    """The client API as ``identity`` reaches it."""
    cluster, issued = ruled
    if identity in issued:
        assert cluster.tls is not None
        where = issued[identity]
        tls = TlsConfig(where / f"{identity}.pem", where / f"{identity}.key", cluster.tls.ca)
    else:
        found = cluster.client_tls(identity)
        assert found is not None
        tls = found
    credentials = tls.channel_credentials()
    with grpc.secure_channel(
        cluster.coordinator_address, credentials, options=tls.channel_options()
    ) as channel:
        yield pb_grpc.CoordinatorStub(channel)


def credit(account: int, amount: int) -> pb.Statement:
    return statement(
        "UPDATE accounts SET balance = balance + %s WHERE id = %s", *to_values([amount, account])
    )


def work(participant: str, *statements: pb.Statement) -> pb.ParticipantStatements:
    return pb.ParticipantStatements(participant=participant, statements=list(statements))


def execute(
    stub: pb_grpc.CoordinatorStub, txid: str, participant: str, *statements: pb.Statement
) -> pb.ExecuteResponse:
    request = pb.ExecuteRequest(
        txid=txid, participant=participant, sequence=1, statements=list(statements)
    )
    return stub.Execute(request, timeout=10)


# --- identities -> participants ----------------------------------------------------------------


def test_an_identity_not_listed_may_not_use_the_client_api(
    ruled: tuple[Cluster, dict[str, Path]], cluster: Cluster
) -> None:
    with coordinator(ruled, STRANGER) as stub:
        calls = {
            "Begin": lambda: stub.Begin(pb.BeginRequest(), timeout=10),
            "RunTransaction": lambda: stub.RunTransaction(
                pb.RunTransactionRequest(work=[work("eu", credit(1, 5))]), timeout=10
            ),
            "GetTransaction": lambda: stub.GetTransaction(
                pb.GetTransactionRequest(request_id="anything"), timeout=10
            ),
        }
        for name, call in calls.items():
            error = refused(call)
            assert code(error) == grpc.StatusCode.PERMISSION_DENIED, name
            assert f"identity {STRANGER!r}" in details(error), name
            assert "identities setting" in details(error), name
    assert balance(cluster, "eu", 1) == 1000


def test_an_identity_uses_only_the_participants_it_is_given(
    ruled: tuple[Cluster, dict[str, Path]], cluster: Cluster
) -> None:
    with coordinator(ruled, LIMITED) as stub:
        txid = stub.Begin(pb.BeginRequest(timeout_ms=30_000), timeout=10).txid
        error = refused(lambda: execute(stub, txid, "us", credit(2, 5)))
        assert code(error) == grpc.StatusCode.PERMISSION_DENIED
        assert f"identity {LIMITED!r} may not use participant 'us'" in details(error)
        assert "identities setting" in details(error)
        assert branch_state(cluster, "us", txid) == pb.BRANCH_STATE_UNKNOWN  # nothing began
        # The transaction is as it was: it goes on where it may.
        execute(stub, txid, "eu", credit(2, 5))
        stub.Commit(pb.CommitRequest(txid=txid, wait_for_phase2=True), timeout=10)

        one_shot = pb.RunTransactionRequest(
            work=[work("eu", credit(3, 5)), work("us", credit(3, 5))]
        )
        error = refused(lambda: stub.RunTransaction(one_shot, timeout=10))
        assert code(error) == grpc.StatusCode.PERMISSION_DENIED
        assert "'us'" in details(error)
    assert (balance(cluster, "eu", 2), balance(cluster, "us", 2)) == (1005, 1000)
    # No branch of the refused one-shot began anywhere: neither half of it ran.
    assert (balance(cluster, "eu", 3), balance(cluster, "us", 3)) == (1000, 1000)
    assert not any(live_branches(cluster, r) for r in cluster.regions)


# --- quotas ------------------------------------------------------------------------------------


def test_one_identity_cannot_take_a_regions_whole_pool(
    ruled: tuple[Cluster, dict[str, Path]], cluster: Cluster
) -> None:
    """other-app opens branches on eu and keeps them idle, trying for the agent's whole pool;
    past its max_sessions_per_identity it is refused, and client's transactions on eu still
    commit promptly."""
    with ExitStack() as stack:
        hog = stack.enter_context(coordinator(ruled, OTHER_APP))
        held: list[str] = []
        refusals: list[grpc.RpcError] = []
        try:
            for _ in range(POOL):
                txid = hog.Begin(pb.BeginRequest(timeout_ms=60_000), timeout=10).txid
                held.append(txid)
                try:
                    execute(hog, txid, "eu", statement("SELECT 1"))
                except grpc.RpcError as err:
                    refusals.append(err)
            assert len(refusals) == POOL - MAX_SESSIONS, "other-app took the whole pool"
            for error in refusals:
                assert code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert f"identity {OTHER_APP!r}" in details(error)
                assert f"max_sessions_per_identity = {MAX_SESSIONS}" in details(error)

            client = stack.enter_context(coordinator(ruled, CLIENT))
            started = time.monotonic()
            answer = client.RunTransaction(
                pb.RunTransactionRequest(work=[work("eu", credit(4, 7))], wait_for_phase2=True),
                timeout=10,
            )
            txid = client.Begin(pb.BeginRequest(), timeout=10).txid
            execute(client, txid, "eu", credit(4, 3))
            execute(client, txid, "us", credit(4, 3))
            client.Commit(pb.CommitRequest(txid=txid, wait_for_phase2=True), timeout=10)
            assert time.monotonic() - started < 3.0  # no wait for a pooled session
            assert answer.state == pb.TRANSACTION_STATE_COMMITTED
            assert (balance(cluster, "eu", 4), balance(cluster, "us", 4)) == (1010, 1003)
        finally:
            for txid in held:
                hog.Rollback(pb.RollbackRequest(txid=txid), timeout=10)


def test_one_identity_cannot_take_every_live_transaction(
    ruled: tuple[Cluster, dict[str, Path]], cluster: Cluster
) -> None:
    with coordinator(ruled, OTHER_APP) as hog, coordinator(ruled, CLIENT) as client:
        held = [hog.Begin(pb.BeginRequest(timeout_ms=60_000), timeout=10).txid]
        try:
            for _ in range(MAX_ACTIVE - 1):
                held.append(hog.Begin(pb.BeginRequest(timeout_ms=60_000), timeout=10).txid)
            error = refused(lambda: hog.Begin(pb.BeginRequest(), timeout=10))
            assert code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"identity {OTHER_APP!r}" in details(error)
            assert f"max_active_per_identity = {MAX_ACTIVE}" in details(error)
            one_shot = pb.RunTransactionRequest(work=[work("us", credit(5, 1))])
            assert code(refused(lambda: hog.RunTransaction(one_shot, timeout=10))) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            # Another identity is not affected.
            txid = client.Begin(pb.BeginRequest(), timeout=10).txid
            execute(client, txid, "us", credit(5, 2))
            client.Commit(pb.CommitRequest(txid=txid, wait_for_phase2=True), timeout=10)
        finally:
            for txid in held:
                hog.Rollback(pb.RollbackRequest(txid=txid), timeout=10)
        # Finished transactions count no more.
        hog.RunTransaction(one_shot, timeout=10)
    assert balance(cluster, "us", 5) == 1003


def test_an_idle_transaction_is_rolled_back_and_its_locks_released(
    ruled: tuple[Cluster, dict[str, Path]], cluster: Cluster
) -> None:
    with coordinator(ruled, CLIENT) as client:
        txid = client.Begin(pb.BeginRequest(timeout_ms=60_000), timeout=10).txid
        execute(client, txid, "eu", credit(6, 50))  # holds the row's lock, then nothing
        assert branch_state(cluster, "eu", txid) == pb.BRANCH_STATE_ACTIVE

        def state() -> pb.TransactionInfo:
            return client.GetTransaction(pb.GetTransactionRequest(txid=txid), timeout=10)

        wait_until(
            lambda: state().state == pb.TRANSACTION_STATE_ABORTED,
            IDLE_MS / 1000 + 15,  # far below the transaction's 60 s deadline
            "the idle transaction rolled back",
            interval=0.1,
        )
        assert "max_idle_ms" in state().abort_reason
        error = refused(lambda: execute(client, txid, "eu", credit(6, 1)))
        assert code(error) == grpc.StatusCode.ABORTED
    assert branch_state(cluster, "eu", txid) == pb.BRANCH_STATE_ROLLED_BACK
    # The row's lock is free: a change waits for no one (the server's lock wait is 1 s).
    with cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
        cursor.execute("UPDATE accounts SET balance = balance WHERE id = 6")
    assert balance(cluster, "eu", 6) == 1000
    assert not prepared(cluster)
