"""The coordinator refuses a statement without asking any agent.

With the agent that would run the statement frozen (SIGSTOP), a refused statement still gets its
InvalidArgument at once, through a one-shot and through an interactive Execute: the answer comes
from the coordinator's own check, not from a call to the agent (which would hang until the
client's deadline).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.support import transfer_sql
from twopc.client import InvalidArgument, RetryPolicy, TransactionState
from twopc.testing.playground.cluster import Cluster


@pytest.fixture
def frozen_us(live_cluster: Cluster) -> Iterator[Cluster]:
    agent = live_cluster.component("agent-us")
    agent.send(signal.SIGSTOP)
    try:
        yield live_cluster
    finally:
        agent.send(signal.SIGCONT)


def test_a_refused_statement_is_answered_while_its_agent_is_frozen(
    frozen_us: Cluster, bank: int
) -> None:
    # No retries and a short deadline: a call that reached the frozen agent would time out.
    impatient = frozen_us.client(retry_policy=RetryPolicy(attempts=1), rpc_timeout=2.0)
    with impatient:
        with pytest.raises(InvalidArgument, match="no transaction was started"):
            impatient.run(
                {"eu": transfer_sql(-1, 4), "us": [("DROP TABLE accounts", [])]}, timeout=5
            )
        with pytest.raises(InvalidArgument, match="no transaction was started"):
            impatient.run({"us": [("TRUNCATE accounts", [])]}, timeout=5)
        tx = impatient.begin(timeout=10)
        tx.execute("eu", "UPDATE accounts SET balance = balance - 1 WHERE id = 4")
        with pytest.raises(InvalidArgument, match="the transaction is as it was"):
            tx.execute("us", "LOCK TABLES accounts WRITE")
        assert tx.state is TransactionState.ACTIVE
        tx.rollback()
