"""What tests read straight from the databases: balances, marker rows, prepared branches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.invariants import committed_markers, prepared_branches
from twopc.testing.playground.mariadb import AGENT_PASSWORD_ENV
from twopc.testing.playground.tls import COORDINATOR
from twopc.tls import TlsConfig
from twopc.values import to_values

# The environment that gives an agent built in a test the password of a scratch server's agent
# user (``AGENT_USER``, created with the least privileges by ``create_agent_user``).
AGENT_ENVIRON = {AGENT_PASSWORD_ENV: "scratch-agent-password"}


def balance(cluster: Cluster, region: str, account: int) -> int:
    with cluster.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT balance FROM accounts WHERE id = %s", [account])
        row = cursor.fetchone()
    assert row is not None, f"no account {account} in {region}"
    return int(row[0])


def markers(cluster: Cluster, txid: str) -> set[str]:
    """The regions where ``txid``'s branch committed."""
    return {region for region, txids in committed_markers(cluster, [txid]).items() if txid in txids}


def sleeping_sessions(cluster: Cluster, region: str) -> int:
    """Sessions on ``region``'s server running a ``SELECT SLEEP(...)`` (a test's long statement)."""
    with cluster.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP%'"
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def prepared(cluster: Cluster) -> dict[str, list[str]]:
    return {region: txids for region, txids in prepared_branches(cluster).items() if txids}


def transfer_sql(amount: int, account: int) -> list[tuple[str, list[int]]]:
    return [("UPDATE accounts SET balance = balance + %s WHERE id = %s", [amount, account])]


def prepare_on_agent(
    cluster: Cluster, region: str, txid: str, amount: int, account: int, *, epoch: int = 0
) -> None:
    """Executes a balance change in a branch on ``region``'s agent and prepares it, straight
    through the Participant API (as a coordinator would, under lease ``epoch``, and then
    forgets it)."""
    with cluster.channel(f"agent-{region}", identity=COORDINATOR) as channel:
        agent = pb_grpc.ParticipantStub(channel)
        agent.Execute(
            pb.BranchExecuteRequest(
                txid=txid,
                participant=region,
                sequence=1,
                timeout_ms=30_000,
                epoch=epoch,
                statements=[
                    pb.Statement(
                        sql="UPDATE accounts SET balance = balance + %s WHERE id = %s",
                        params=to_values([amount, account]),
                    )
                ],
            )
        )
        vote = agent.Prepare(pb.PrepareRequest(txid=txid, participant=region, epoch=epoch))
    assert vote.vote == pb.VOTE_PREPARED


ROOT = Path(__file__).resolve().parents[1]


def run_twopc(
    *arguments: str, cwd: Path, coordinator: str | None = None, tls: TlsConfig | None = None
) -> subprocess.CompletedProcess[str]:
    """``twopc ARGUMENTS`` (this checkout's, as ``-m twopc.cli``) in ``cwd``, with
    ``TWOPC_COORDINATOR`` and the ``TWOPC_TLS_*`` variables set from ``coordinator`` and
    ``tls`` only (none of them inherited)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "TWOPC_COORDINATOR" and not k.startswith("TWOPC_TLS_")
    }
    env["PYTHONPATH"] = str(ROOT)
    if coordinator is not None:
        env["TWOPC_COORDINATOR"] = coordinator
    if tls is not None:
        env |= {"TWOPC_TLS_CERT": str(tls.cert), "TWOPC_TLS_KEY": str(tls.key)}
        env["TWOPC_TLS_CA"] = str(tls.ca)
    return subprocess.run(
        [sys.executable, "-m", "twopc.cli", *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
