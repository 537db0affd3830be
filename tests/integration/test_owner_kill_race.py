"""Finishing a prepared branch whose owner session is still alive (a frozen or replaced agent).

Chaos seed 105, on the Pipeline code: an agent committed two branches from an admin session right
after killing their owner sessions. MariaDB 10.11 answered OK, yet left both transactions behind
uncommitted, out of XA RECOVER, holding their row locks; after the next restart of the server
they were prepared again, with the coordinator's COMMIT record already closed. Run by hand,
XA COMMIT at once after KILL of the owner lost about 1 commit in 10; after waiting for the owner
to leave the processlist, none in 400. The agent now waits, and checks that the commit landed.

This test walks that path forty times and checks the server afterwards. On a quiet machine the
owner dies within the 20 ms the agent used to wait between attempts, so it does not catch the
race every time; the chaos run under load did.
"""

from __future__ import annotations

import asyncio

from participants.calls import StatementRequest
from participants.config import AgentConfig
from participants.daemon import build_agent
from twopc.failpoints import Failpoints
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.mariadb import AGENT_PASSWORD_ENV, AGENT_USER
from twopc.txid import Xid
from twopc.votes import Vote

ROUNDS = 40
TABLE = "owner_kill_race"


def test_a_branch_committed_after_killing_its_owner_is_committed(live_cluster: Cluster) -> None:
    host, port = live_cluster.component("mariadb-eu").address.rsplit(":", 1)
    # As the cluster's agents run: its least-privilege user, who may kill its own sessions only.
    config = AgentConfig(
        name="eu",
        mysql_host=host,
        mysql_port=int(port),
        mysql_user=AGENT_USER,
        coordinator_ids=("elsewhere",),
        pool_size=ROUNDS + 4,
    )
    environ = {AGENT_PASSWORD_ENV: live_cluster.component("agent-eu").env[AGENT_PASSWORD_ENV]}
    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"CREATE TABLE {TABLE} (id INT PRIMARY KEY)")
    # A coordinator id of no running coordinator: the cluster's recovery leaves these alone.
    txids = [f"elsewhere.r-owner-kill-{i}" for i in range(ROUNDS)]

    async def walk() -> None:
        owner, other = (build_agent(config, environ, Failpoints()) for _ in range(2))
        try:
            await owner.start()
            await other.start()
            for i, txid in enumerate(txids):
                insert = StatementRequest(f"INSERT INTO {TABLE} (id) VALUES (%s)", [i])
                vote = await owner.prepare(txid, "eu", [insert], 1, 30_000)
                assert vote.vote is Vote.PREPARED
                # `other` has never seen the branch: it must kill the owner's session to commit.
                await other.commit(txid, "eu", one_phase=False)
        finally:
            await owner.close(patience=0.1)
            await other.close(patience=0.1)

    asyncio.run(walk())

    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {TABLE}")
        assert cursor.fetchone() == (ROUNDS,), "an XA COMMIT answered OK did not commit"
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_mysql_thread_id = 0"
        )
        assert cursor.fetchone() == (0,), "a transaction was left behind without a session"
        cursor.execute("XA RECOVER")
        xids = (Xid.from_recover_row(int(f), int(g), bytes(d)) for f, g, _b, d in cursor.fetchall())
        assert not [xid for xid in xids if xid is not None and xid.txid in txids]
