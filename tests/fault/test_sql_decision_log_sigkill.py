"""A coordinator killed with SIGKILL loses no acknowledged commit decision in a SQL store.

As test_decision_log_sigkill, with the SQL log on a real MariaDB and a real PostgreSQL: a child
records COMMITs from 64 tasks (ending every other one) and prints each txid once acknowledged; it
is killed after a few hundred; the parent reopens the log and finds every acknowledged, never
ended decision open. Three rounds on the same store.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.decision_log import Replay
from coordinator.decision_log.sql_log import SqlDecisionLog
from tests.fault.test_decision_log_sigkill import ACKS_BEFORE_KILL, DEADLINE, run_until_killed
from tests.sql_stores import KINDS, Stores

pytestmark = pytest.mark.fault

CHILD = Path(__file__).with_name("sql_decision_log_child.py")


async def reopened(url: str) -> Replay:
    log = SqlDecisionLog(url, coordinator_id="k")
    replay = await log.open()
    await log.close()
    return replay


@pytest.mark.parametrize("kind", KINDS)
def test_no_acknowledged_commit_is_lost_to_sigkill(kind: str, sql_stores: Stores) -> None:
    url = sql_stores.new_database(kind)
    never_ended: list[str] = []
    for round_number in range(3):
        acknowledged = run_until_killed(url, f"k{round_number}", CHILD)
        assert len(acknowledged) == len(set(acknowledged)) >= ACKS_BEFORE_KILL
        never_ended += [txid for txid in acknowledged if int(txid.rpartition(".")[2]) % 2]
        replay = asyncio.run(asyncio.wait_for(reopened(url), DEADLINE))
        still_open = {record.txid for record in replay.open_commits}
        missing = [txid for txid in never_ended if txid not in still_open]
        assert not missing, f"acknowledged but lost: {missing[:10]} ({len(missing)} in all)"
