"""The group's request claims (``coordinator.request_claims``) on a real MariaDB and PostgreSQL:
the first claim holds and every later one reads it (also when they race), a txid answers one
identity's request id, a claim's owner, the lease standing and COMMIT rows it reads, and the
collection of old rows by the store's clock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.decision_log.leases import SqlLeases
from coordinator.decision_log.sql_log import SqlDecisionLog
from coordinator.engine.ports import Standing
from coordinator.request_claims import SqlRequestClaims, owner_hash
from tests.sql_stores import KINDS, Stores, rows
from tests.unit.test_decision_log import commit, run


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, sql_stores: Stores) -> str:
    return sql_stores.new_database(str(request.param))


@pytest.fixture
def claims(url: str) -> Iterator[SqlRequestClaims]:
    leases = SqlLeases(url)
    made = SqlRequestClaims(url, leases=leases, member="member-b")
    try:
        yield made
    finally:
        made.close()
        leases.close()


def test_the_first_claim_holds_and_racing_claims_read_it(claims: SqlRequestClaims) -> None:
    async def scenario() -> list[str | None]:
        return list(
            await asyncio.gather(
                *(claims.claim("client", "pay-1", f"c{n}.r-pay-1") for n in range(1, 9))
            )
        )

    # The tables first (a member's lease acquire makes them before any claim): concurrent
    # first opens of an empty PostgreSQL database race in CREATE TABLE IF NOT EXISTS.
    assert run(claims.claimed("client", "pay-1")) is None
    held = run(scenario())
    assert len(set(held)) == 1
    assert held[0] is not None
    assert run(claims.claimed("client", "pay-1")) == held[0]
    assert run(claims.claimed("other-app", "pay-1")) is None
    assert run(claims.claimed_by(held[0], "client")) is True
    assert run(claims.claimed_by(held[0], "other-app")) is False
    assert run(claims.claimed_by("c9.r-nobody", "client")) is None


def test_claims_made_at_once_share_store_transactions_and_each_gets_its_answer(
    claims: SqlRequestClaims, url: str
) -> None:
    """200 claims at once on one member: written in batches (fewer store transactions than
    claims), each answered for itself: a new key with its own txid, a key claimed twice in one
    batch with the first txid, a txid already another identity's with None."""
    assert run(claims.claim("client", "first", "c1.r-taken")) == "c1.r-taken"
    batches: list[int] = []
    write = claims._claim_many

    def counted(conn: Any, batch: Any) -> Any:
        batches.append(len(batch))
        return write(conn, batch)

    claims._claim_many = counted  # type: ignore[method-assign]

    async def scenario() -> list[str | None]:
        wanted = [("client", f"k{n}", f"c1.r-k{n}") for n in range(200)]
        wanted += [("client", "k7", "c2.r-k7"), ("other-app", "x", "c1.r-taken")]
        return list(await asyncio.gather(*(claims.claim(o, r, t) for o, r, t in wanted)))

    held = run(scenario())
    assert held[:200] == [f"c1.r-k{n}" for n in range(200)]
    assert held[200] == "c1.r-k7", "the key's first claim holds, in the same batch too"
    assert held[201] is None, "a txid answers one identity's request id"
    assert len(rows(url, "SELECT txid FROM twopc_requests")) == 201
    assert sum(batches) == 202
    assert len(batches) < 202 / 4, f"claims share store transactions: {batches}"


def test_a_txid_answers_one_identitys_request_id(claims: SqlRequestClaims, url: str) -> None:
    assert run(claims.claim("client", "pay-1", "c1.r-pay-1")) == "c1.r-pay-1"
    assert run(claims.claim("other-app", "pay-1", "c1.r-pay-1")) is None
    fresh = "c1.0000018f00000000000000000000beef"
    assert run(claims.claim("other-app", "pay-1", fresh)) == fresh
    run(claims.unclaim("other-app", "pay-1", "c1.r-pay-1"))  # not its txid: nothing
    assert run(claims.claimed("other-app", "pay-1")) == fresh
    run(claims.unclaim("other-app", "pay-1", fresh))
    assert run(claims.claimed("other-app", "pay-1")) is None
    assert rows(url, "SELECT owner_hash, request_id, txid FROM twopc_requests") == [
        (owner_hash("client"), "pay-1", "c1.r-pay-1")
    ]


def test_standing_and_commit_rows_come_from_the_store(claims: SqlRequestClaims, url: str) -> None:
    async def scenario() -> None:
        leases = SqlLeases(url)
        try:
            assert (await claims.standing("c1")).standing is Standing.RESOLVED  # no row
            lease = await leases.acquire("c1", "member-a", 60_000)
            live = await claims.standing("c1")
            assert (live.standing, live.holder) == (Standing.LIVE, "member-a")
            await leases.release(lease)
            assert (await claims.standing("c1")).standing is Standing.DUE
            mine = await leases.acquire("c1", "member-b", 60_000)
            assert (await claims.standing("c1")).standing is Standing.RESOLVED
            await leases.release(mine, free=True)
            assert (await claims.standing("c1")).standing is Standing.RESOLVED
        finally:
            leases.close()
        log = SqlDecisionLog(url, coordinator_id="c1")
        await log.open()
        await log.record_commit(commit(1))
        await log.close()
        assert await claims.has_commit("c1", commit(1).txid)
        assert not await claims.has_commit("c2", commit(1).txid)

    run(scenario())


def test_old_claims_are_collected_by_the_stores_clock(claims: SqlRequestClaims, url: str) -> None:
    run(claims.claim("client", "old", "c1.r-old"))
    run(claims.claim("client", "new", "c1.r-new"))
    rows(
        url,
        "UPDATE twopc_requests SET created_at = created_at - INTERVAL '8' DAY "
        "WHERE request_id = 'old'"
        if "mysql" in url or "mariadb" in url
        else "UPDATE twopc_requests SET created_at = created_at - INTERVAL '8 days' "
        "WHERE request_id = 'old'",
    )
    assert run(claims.collect()) == 1
    assert rows(url, "SELECT request_id FROM twopc_requests") == [("new",)]
