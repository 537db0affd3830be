"""What only the SQL decision log does: a store out of reach (DecisionLogFull, then usable again),
a connection lost during COMMIT (DecisionLogFailed), the schema version, its rows, its settings.
Against a real MariaDB and a real PostgreSQL, through a proxy that cuts links."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import sqlalchemy
from structlog.testing import capture_logs

from coordinator.decision_log import (
    AuditRecord,
    DecisionLogCorrupted,
    DecisionLogFailed,
    DecisionLogFull,
)
from coordinator.decision_log.sql_log import SqlDecisionLog, store_url
from tests.sql_stores import KINDS, CutProxy, Stores, proxy_to, rows, via
from tests.unit.test_decision_log import commit, run


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(kind: str, sql_stores: Stores) -> str:
    return sql_stores.new_database(kind)


@pytest.fixture
def proxy(kind: str, sql_stores: Stores) -> Iterator[CutProxy]:
    with proxy_to(sql_stores.port(kind)) as made:
        yield made


async def replay_commits(url: str, coordinator_id: str = "c1") -> list[str]:
    log = SqlDecisionLog(url, coordinator_id=coordinator_id)
    replay = await log.open()
    await log.close()
    return [record.txid for record in replay.open_commits]


def test_a_store_out_of_reach_fails_the_batch_and_the_log_recovers(
    url: str, proxy: CutProxy
) -> None:
    async def scenario() -> None:
        log = SqlDecisionLog(via(url, proxy.port), coordinator_id="c1", timeout_s=2)
        await log.open()
        await log.record_commit(commit(1))
        proxy.cut()
        results = await asyncio.gather(
            *(log.record_commit(commit(n)) for n in (2, 3, 4)), return_exceptions=True
        )
        for n, result in zip((2, 3, 4), results, strict=True):
            assert isinstance(result, DecisionLogFull), result
            assert "not committed" in result.message
            assert result.txid == commit(n).txid
        assert await replay_commits(url) == [commit(1).txid]  # nothing of the batch
        proxy.heal()
        await log.record_commit(commit(5))
        assert log.open_commits() == [commit(1), commit(5)]
        await log.close()

    run(scenario())
    assert run(replay_commits(url)) == [commit(1).txid, commit(5).txid]


def test_a_write_the_store_refuses_fails_the_batch_and_the_log_stays_usable(url: str) -> None:
    async def scenario() -> None:
        log = SqlDecisionLog(url, coordinator_id="c1")
        await log.open()
        rows(url, "ALTER TABLE twopc_commits ADD CONSTRAINT refuse_all CHECK (seq < 0)")
        with pytest.raises(DecisionLogFull, match="could not write 1 commit decision") as caught:
            await log.record_commit(commit(1))
        assert caught.value.txid == commit(1).txid
        rows(url, "ALTER TABLE twopc_commits DROP CONSTRAINT refuse_all")
        await log.record_commit(commit(2))
        await log.close()

    run(scenario())
    assert run(replay_commits(url)) == [commit(2).txid]


def test_a_connection_the_store_dropped_while_idle_is_replaced_at_once(url: str, kind: str) -> None:
    """A store restart or an idle timeout ends the writer's connection between batches: the
    next batch finds it dead at its first statement and is written on a new one, no abort."""

    async def scenario() -> None:
        log = SqlDecisionLog(url, coordinator_id="c1")
        await log.open()
        await log.record_commit(commit(1))
        if kind == "postgresql":
            killed = rows(
                url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
        else:
            ids = rows(
                url,
                "SELECT id FROM information_schema.processlist "
                "WHERE db = database() AND id <> connection_id()",
            )
            killed = [rows(url, f"KILL CONNECTION {connection_id}") for (connection_id,) in ids]
        assert len(killed) == 1
        await log.record_commit(commit(2))
        await log.close()

    run(scenario())
    assert run(replay_commits(url)) == [commit(1).txid, commit(2).txid]


def test_a_connection_lost_during_commit_fails_the_log(url: str, proxy: CutProxy) -> None:
    async def scenario() -> None:
        log = SqlDecisionLog(via(url, proxy.port), coordinator_id="c1", timeout_s=2)
        await log.open()
        await log.record_commit(commit(1))
        proxy.cut_on_commit = True
        with capture_logs() as logs:
            results = await asyncio.gather(
                *(log.record_commit(commit(n)) for n in (2, 3)), return_exceptions=True
            )
        assert proxy.commits_cut == 1
        for result in results:
            assert isinstance(result, DecisionLogFailed), result
            assert "whether they are durable is unknown" in result.message
        assert any(entry["event"] == "decision_log_failed" for entry in logs)
        proxy.cut_on_commit = False
        with pytest.raises(DecisionLogFailed, match="Stop the coordinator"):
            await log.record_commit(commit(4))
        with pytest.raises(DecisionLogFailed):
            await log.record_end(commit(1).txid)
        await log.close()

    run(scenario())
    assert run(replay_commits(url)) == [commit(1).txid]  # the store rolled the cut one back


def test_a_store_that_stops_answering_during_commit_fails_the_log_in_time(
    url: str, proxy: CutProxy
) -> None:
    async def scenario() -> None:
        log = SqlDecisionLog(via(url, proxy.port), coordinator_id="c1", timeout_s=1)
        await log.open()
        await log.record_commit(commit(1))
        proxy.stall_on_commit = True
        started = time.monotonic()
        with pytest.raises(DecisionLogFailed, match="whether they are durable is unknown"):
            await log.record_commit(commit(2))
        assert proxy.commits_stalled == 1
        assert time.monotonic() - started < 5, "the COMMIT's wait was not bounded"
        await log.close()

    run(scenario())
    assert run(replay_commits(url)) == [commit(1).txid]


def test_a_lost_end_only_batch_is_written_with_the_next_one(url: str, proxy: CutProxy) -> None:
    async def scenario() -> None:
        log = SqlDecisionLog(via(url, proxy.port), coordinator_id="c1", end_flush_delay=0.01)
        await log.open()
        await log.record_commit(commit(1))
        proxy.cut_on_commit = True
        await log.record_end(commit(1).txid)
        deadline = time.monotonic() + 5
        while proxy.commits_cut == 0:  # the END-only batch's COMMIT was cut
            assert time.monotonic() < deadline, "no END-only batch was sent"
            await asyncio.sleep(0.005)
        proxy.cut_on_commit = False
        assert await replay_commits(url) == [commit(1).txid]
        await log.record_commit(commit(2))  # the log did not fail; the END rides along
        await log.close()

    run(scenario())
    assert run(replay_commits(url)) == [commit(2).txid]


def test_a_log_of_an_unknown_schema_version_is_refused(url: str) -> None:
    run(replay_commits(url))  # creates the tables at version 3
    rows(url, "UPDATE twopc_log_schema SET version = 4 WHERE id = 1")
    with pytest.raises(DecisionLogCorrupted, match="schema version 4") as caught:
        run(replay_commits(url))
    assert "reads version 3 (and upgrades [1, 2]) only" in caught.value.message
    assert rows(url, "SELECT version FROM twopc_log_schema") == [(4,)]


def test_a_version_1_log_gets_the_lease_table_and_keeps_its_rows(url: str) -> None:
    async def write() -> None:
        log = SqlDecisionLog(url, coordinator_id="c1")
        await log.open()
        await log.record_commit(commit(1))
        await log.close()

    run(write())
    rows(url, "DROP TABLE twopc_leases")  # as version 1 left it
    rows(url, "DROP TABLE twopc_requests")
    rows(url, "UPDATE twopc_log_schema SET version = 1 WHERE id = 1")
    assert run(replay_commits(url)) == [commit(1).txid]
    assert rows(url, "SELECT version FROM twopc_log_schema") == [(3,)]
    assert rows(url, "SELECT count(*) FROM twopc_leases") == [(0,)]
    assert rows(url, "SELECT count(*) FROM twopc_requests") == [(0,)]


def test_a_version_2_log_gets_the_request_table_and_keeps_its_rows(url: str) -> None:
    async def write() -> None:
        log = SqlDecisionLog(url, coordinator_id="c1")
        await log.open()
        await log.record_commit(commit(1))
        await log.close()

    run(write())
    rows(url, "DROP TABLE twopc_requests")  # as version 2 left it
    rows(url, "UPDATE twopc_log_schema SET version = 2 WHERE id = 1")
    assert run(replay_commits(url)) == [commit(1).txid]
    assert rows(url, "SELECT version FROM twopc_log_schema") == [(3,)]
    assert rows(url, "SELECT count(*) FROM twopc_requests") == [(0,)]


@pytest.mark.parametrize("participants", ["not json", '{"a": 1}', '["a", 2]'])
def test_a_commit_row_with_bad_participants_is_refused(url: str, participants: str) -> None:
    async def write() -> None:
        log = SqlDecisionLog(url, coordinator_id="c1")
        await log.open()
        await log.record_commit(commit(1))
        await log.close()

    run(write())
    rows(url, "UPDATE twopc_commits SET participants = :p", p=participants)
    with pytest.raises(DecisionLogCorrupted, match="not a JSON list of names"):
        run(replay_commits(url))


def test_the_tables_are_created_once_with_a_version_row(url: str) -> None:
    run(replay_commits(url))
    run(replay_commits(url))
    assert rows(url, "SELECT id, version FROM twopc_log_schema") == [(1, 3)]


def test_coordinators_sharing_a_store_keep_their_own_rows(url: str) -> None:
    async def scenario() -> None:
        one = SqlDecisionLog(url, coordinator_id="c1")
        two = SqlDecisionLog(url, coordinator_id="c2")
        await one.open()
        await two.open()
        await one.record_commit(commit(1))
        await two.record_commit(commit(1))  # the same txid under another coordinator
        await two.record_end(commit(1).txid)
        await one.close()
        await two.close()

    run(scenario())
    assert run(replay_commits(url, "c1")) == [commit(1).txid]
    assert run(replay_commits(url, "c2")) == []


def test_ended_rows_and_old_audits_are_deleted(url: str) -> None:
    async def scenario() -> None:
        log = SqlDecisionLog(url, coordinator_id="c1", audit_keep=2, end_flush_delay=0.001)
        await log.open()
        for n in range(50):
            await log.record_commit(commit(n))
            await log.record_end(commit(n).txid)
        for n in range(5):
            await log.record_audit(AuditRecord(n, "admin", "drain", "", "commit", f"reason {n}"))
        await log.close()

    run(scenario())
    assert rows(url, "SELECT count(*) FROM twopc_commits") == [(0,)]
    assert rows(url, "SELECT reason FROM twopc_audits ORDER BY seq") == [
        ("reason 3",),
        ("reason 4",),
    ]


def test_a_store_out_of_reach_at_open_is_a_failed_log(url: str, proxy: CutProxy) -> None:
    proxy.cut()
    with pytest.raises(DecisionLogFailed, match="cannot open the decision log"):
        run(replay_commits(via(url, proxy.port)))


def test_the_password_goes_to_the_store_and_into_no_message(kind: str, url: str) -> None:
    secret = "not-in-any-message-7"
    parsed = store_url(url)
    user = "twopc_log"
    admin = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.NullPool)
    with admin.begin() as conn:
        if kind == "mariadb":
            conn.execute(sqlalchemy.text(f"CREATE USER {user}@'%' IDENTIFIED BY '{secret}'"))
            conn.execute(sqlalchemy.text(f"GRANT ALL ON {parsed.database}.* TO {user}@'%'"))
        else:
            conn.execute(sqlalchemy.text(f"CREATE USER {user} PASSWORD '{secret}'"))
            conn.execute(sqlalchemy.text(f"GRANT ALL ON SCHEMA public TO {user}"))
    admin.dispose()
    as_user = parsed.set(username=user).render_as_string(hide_password=False)

    async def scenario() -> None:
        log = SqlDecisionLog(as_user, coordinator_id="c1", password=secret)
        with capture_logs() as logs:
            await log.open()
            await log.record_commit(commit(1))
            await log.close()
        assert secret not in repr(logs)
        assert secret not in log.name

    try:
        run(scenario())
        if kind == "postgresql":  # trust on loopback: the password is not checked there
            return
        wrong = SqlDecisionLog(as_user, coordinator_id="c1", password="wrong")
        with pytest.raises(DecisionLogFailed) as caught:
            run(wrong.open())
        assert "wrong" not in caught.value.message.replace("wrong.open", "")
    finally:
        with sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.NullPool).begin() as conn:
            if kind == "mariadb":
                conn.execute(sqlalchemy.text(f"DROP USER {user}@'%'"))
