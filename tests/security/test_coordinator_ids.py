"""An agent starts branches only for the coordinator ids it serves (issue 10, finding 4).

A caller the agent obeys (the coordinator's identity) used to make, with ``Prepare(txid="c9.…")``,
a prepared branch of a coordinator id that no coordinator recovers: it held its locks for ever.
Now every call that starts or prepares a branch of an id outside ``coordinator_ids`` is refused
with nothing sent to MySQL (checked with XA RECOVER and the row it would have changed), and the
agent warns at start of prepared branches of ids it does not serve.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator

import grpc
import pytest
from structlog.testing import capture_logs

from tests.security.conftest import PASSWORD
from tests.security.hostile import agent, branch_state, code, details, refused, statement
from tests.security.support import DATABASE, MakeUser, readme_grants, started
from tests.security.test_statement_paths import _pipeline_prepare
from tests.support import balance, prepared
from twopc.api import twopc_pb2 as pb
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.mariadb import MariaDBInstance
from twopc.txid import Xid

REGION = "eu"
ADD_ONE = statement("UPDATE accounts SET balance = balance + 1 WHERE id = 6")


@pytest.fixture
def foreign_txid(live_cluster: Cluster) -> Iterator[str]:
    """A txid of coordinator id ``c9``, which the cluster's agents do not serve; whatever a
    test made of it (if the agent wrongly started it) is rolled back after the test."""
    txid = f"c9.{secrets.token_hex(16)}"
    yield txid
    with agent(live_cluster, REGION) as stub:
        stub.Rollback(pb.BranchRollbackRequest(txid=txid, participant=REGION), timeout=10)


def test_branches_of_a_coordinator_id_it_does_not_serve_are_refused(
    live_cluster: Cluster, bank: int, foreign_txid: str
) -> None:
    txid = foreign_txid
    with agent(live_cluster, REGION) as stub:
        calls: dict[str, Callable[[], object]] = {
            "Execute": lambda: stub.Execute(
                pb.BranchExecuteRequest(
                    txid=txid, participant=REGION, sequence=1, statements=[ADD_ONE]
                ),
                timeout=10,
            ),
            "Prepare": lambda: stub.Prepare(
                pb.PrepareRequest(txid=txid, participant=REGION, sequence=1, statements=[ADD_ONE]),
                timeout=10,
            ),
            "Prepare without statements": lambda: stub.Prepare(
                pb.PrepareRequest(txid=txid, participant=REGION), timeout=10
            ),
            "one-phase Commit": lambda: stub.Commit(
                pb.BranchCommitRequest(
                    txid=txid, participant=REGION, one_phase=True, sequence=1, statements=[ADD_ONE]
                ),
                timeout=10,
            ),
            "Pipeline prepare": lambda: _pipeline_prepare(
                stub,
                pb.PrepareRequest(txid=txid, participant=REGION, sequence=1, statements=[ADD_ONE]),
            ),
        }
        for name, call in calls.items():
            error = refused(call)
            assert code(error) == grpc.StatusCode.FAILED_PRECONDITION, name
            assert "'c9'" in details(error), name
            assert "coordinator_ids" in details(error), name
    assert branch_state(live_cluster, REGION, txid) == pb.BRANCH_STATE_UNKNOWN
    assert not [t for t in prepared(live_cluster).get(REGION, []) if t.startswith("c9.")]
    assert balance(live_cluster, REGION, 6) == 1000  # nothing ran on MariaDB


def _prepare_stray(db: MariaDBInstance, user: str, txid: str) -> Xid:
    """A prepared twopc branch of ``txid`` on participant eu, made as the agent's own user and
    left behind when its session ends (as a crashed agent of another coordinator would)."""
    xid = Xid(txid, "eu")
    with db.connect(DATABASE, user=user, password=PASSWORD) as conn, conn.cursor() as cursor:
        cursor.execute(f"XA START {xid.sql()}")
        cursor.execute("INSERT INTO strays (id) VALUES (1)")
        cursor.execute(f"XA END {xid.sql()}")
        cursor.execute(f"XA PREPARE {xid.sql()}")
    return xid


def test_the_agent_warns_of_prepared_branches_it_does_not_serve(
    security_mariadb: MariaDBInstance, make_user: MakeUser
) -> None:
    with security_mariadb.connect(DATABASE) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS strays (id INT PRIMARY KEY) ENGINE=InnoDB")
        cursor.execute("DELETE FROM strays")
    user = make_user(readme_grants())
    stray = _prepare_stray(security_mariadb, user.name, f"c9.{secrets.token_hex(16)}")
    try:

        async def start_and_stop() -> None:
            await (await started(user)).close()

        with capture_logs() as logs:
            asyncio.run(start_and_stop())
        warnings = [e for e in logs if e["event"] == "foreign_prepared_branches"]
        assert len(warnings) == 1, logs
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["count"] == 1
        assert warnings[0]["txids"] == [stray.txid]
        assert warnings[0]["coordinator_ids"] == ["c1", "sec"]
    finally:
        with security_mariadb.connect(DATABASE) as conn, conn.cursor() as cursor:
            cursor.execute(f"XA ROLLBACK {stray.sql()}")
