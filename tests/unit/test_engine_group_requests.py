"""Request ids across a coordinator group, in the engine against fakes: a fake of the store's
claims (``RequestClaimPort``) shared by two managers, c1 and c2, as two members share the store.

A request is claimed before anything of it runs; one claimed by another member's transaction
is answered UNAVAILABLE (naming the member) while that id's lease is live or due for a
takeover, and with its final outcome (the store's COMMIT row, else the markers) once resolved;
GetTransaction by txid or request id follows the same rule, and tells an identity nothing of
another's. Also the pure pieces of ``coordinator.request_claims``.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from coordinator.decision_log import Replay
from coordinator.decision_log.leases import LeaseRow
from coordinator.engine.manager import TransactionManager
from coordinator.engine.ports import IdStanding, Standing
from coordinator.engine.states import TxState
from coordinator.request_claims import owner_hash, standing_of
from tests.unit.fakes import BranchState, FakeClock, FakeParticipants, InMemoryDecisionLog
from tests.unit.test_engine import SETTINGS, WRITE, scenario
from twopc.errors import FailedPrecondition, NotFound, TransactionAborted, Unavailable


class FakeClaims:
    """The store's claims, lease standings and COMMIT rows, in memory."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], str] = {}
        self.standings: dict[str, IdStanding] = {}
        self.commits: set[tuple[str, str]] = set()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise Unavailable("the store does not answer")

    async def claim(self, owner: str | None, request_id: str, txid: str) -> str | None:
        self._check()
        key = (owner_hash(owner), request_id)
        if key in self.rows:
            return self.rows[key]
        if txid in self.rows.values():
            return None
        self.rows[key] = txid
        return txid

    async def claimed(self, owner: str | None, request_id: str) -> str | None:
        self._check()
        return self.rows.get((owner_hash(owner), request_id))

    async def unclaim(self, owner: str | None, request_id: str, txid: str) -> None:
        if self.rows.get((owner_hash(owner), request_id)) == txid:
            del self.rows[(owner_hash(owner), request_id)]

    async def claimed_by(self, txid: str, owner: str | None) -> bool | None:
        self._check()
        for (hashed, _), held in self.rows.items():
            if held == txid:
                return hashed == owner_hash(owner)
        return None

    async def standing(self, coordinator_id: str) -> IdStanding:
        self._check()
        return self.standings.get(coordinator_id, IdStanding(Standing.RESOLVED))

    async def has_commit(self, coordinator_id: str, txid: str) -> bool:
        self._check()
        return (coordinator_id, txid) in self.commits


@dataclasses.dataclass
class Group:
    ports: FakeParticipants
    claims: FakeClaims
    c1: TransactionManager
    c2: TransactionManager


def make_group(**overrides: Any) -> Group:
    ports = FakeParticipants(("eu", "us"))
    claims = FakeClaims()

    def member(coordinator_id: str) -> TransactionManager:
        settings = dataclasses.replace(SETTINGS, coordinator_id=coordinator_id, **overrides)
        return TransactionManager(
            settings, ports, InMemoryDecisionLog(), clock=FakeClock(), claims=claims
        )

    return Group(ports, claims, member("c1"), member("c2"))


WORK = [("eu", [WRITE]), ("us", [WRITE])]


@scenario
async def test_a_request_is_claimed_before_it_runs_and_a_retry_here_is_answered_as_before() -> None:
    group = make_group()
    ran = await group.c1.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="a")
    assert ran.txid == "c1.r-pay-1"
    assert group.claims.rows == {(owner_hash("a"), "pay-1"): "c1.r-pay-1"}
    commits = len(group.ports.calls_of("commit"))
    again = await group.c1.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="a")
    assert again.txid == ran.txid
    assert len(group.ports.calls_of("commit")) == commits


@scenario
async def test_a_retry_on_another_member_waits_while_the_first_ones_id_is_live_or_due() -> None:
    group = make_group()
    await group.c1.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="a")
    commits = len(group.ports.calls_of("commit"))
    for standing in (Standing.LIVE, Standing.DUE):
        group.claims.standings["c1"] = IdStanding(standing, "member-a")
        for call in (
            group.c2.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="a"),
            group.c2.begin_request(5_000, "pay-1", owner="a"),
            group.c2.lookup_request("pay-1", owner="a"),
            group.c2.lookup("c1.r-pay-1", owner="a"),
        ):
            with pytest.raises(Unavailable, match=r"on coordinator c1 \(member member-a\)"):
                await call
    assert len(group.ports.calls_of("commit")) == commits  # nothing ran twice
    assert not group.c2.live_transactions()


@scenario
async def test_once_resolved_a_retry_on_another_member_gets_the_committed_outcome() -> None:
    group = make_group()
    await group.c1.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="a")
    commits = len(group.ports.calls_of("commit"))
    # Freed, or held by c2's member in a takeover: the markers tell.
    again = await group.c2.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="a")
    assert (again.txid, again.state, again.results) == ("c1.r-pay-1", TxState.COMMITTED, {})
    assert len(group.ports.calls_of("commit")) == commits
    with pytest.raises(FailedPrecondition, match=r"already ran as transaction c1\.r-pay-1"):
        await group.c2.begin_request(5_000, "pay-1", owner="a")
    assert (await group.c2.lookup_request("pay-1", owner="a")).state is TxState.COMMITTED
    assert (await group.c2.lookup("c1.r-pay-1", owner="a")).state is TxState.COMMITTED


@scenario
async def test_a_commit_row_in_the_store_answers_committing() -> None:
    group = make_group()
    group.claims.rows[(owner_hash("a"), "pay-2")] = "c1.r-pay-2"
    group.claims.commits.add(("c1", "c1.r-pay-2"))
    again = await group.c2.run(WORK, timeout_ms=5_000, request_id="pay-2", owner="a")
    assert (again.txid, again.state) == ("c1.r-pay-2", TxState.COMMITTING)
    assert group.ports.calls == []


@scenario
async def test_a_request_that_aborted_elsewhere_is_aborted_and_runs_nothing() -> None:
    group = make_group()
    group.claims.rows[(owner_hash("a"), "pay-3")] = "c1.r-pay-3"
    group.ports.seed("eu", "c1.r-pay-3", BranchState.ROLLED_BACK)
    with pytest.raises(TransactionAborted, match="presumed abort"):
        await group.c2.run(WORK, timeout_ms=5_000, request_id="pay-3", owner="a")
    assert not group.ports.calls_of("execute")
    assert not group.ports.calls_of("commit")
    with pytest.raises(FailedPrecondition, match=r"finished \(aborted\)"):
        await group.c2.begin_request(5_000, "pay-3", owner="a")


@scenario
async def test_another_identity_learns_nothing_of_a_request_or_its_txid() -> None:
    group = make_group()
    await group.c1.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="a")
    group.claims.standings["c1"] = IdStanding(Standing.LIVE, "member-a")
    unused = await group.c2.lookup_request("pay-1", owner="b")
    assert (unused.txid, unused.state, unused.presumed) == ("c2.r-pay-1", TxState.ABORTED, True)
    with pytest.raises(NotFound) as claimed:
        await group.c2.lookup("c1.r-pay-1", owner="b")
    with pytest.raises(NotFound) as unclaimed:
        await group.c2.lookup("c1.r-never-claimed", owner="b")
    # The same answer, claimed or not: nothing tells b that a's transaction exists.
    assert claimed.value.message.replace("c1.r-pay-1", "X") == unclaimed.value.message.replace(
        "c1.r-never-claimed", "X"
    )
    # b's request under the same id is a transaction of its own, here.
    own = await group.c2.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="b")
    assert own.txid == "c2.r-pay-1"


@scenario
async def test_an_unclaimed_foreign_txid_is_shown_to_admins_and_plaintext_only() -> None:
    group = make_group(admin_identities=("ops",))
    txid = "c1.0000018f00000000000000000000beef"
    group.ports.seed("eu", txid, BranchState.COMMITTED)
    with pytest.raises(NotFound):
        await group.c2.lookup(txid, owner="a")
    assert (await group.c2.lookup(txid, owner="ops")).state is TxState.COMMITTED
    assert (await group.c2.lookup(txid, owner=None)).state is TxState.COMMITTED


@scenario
async def test_the_request_ids_own_txid_held_by_another_identity_gets_a_fresh_one() -> None:
    group = make_group()
    group.claims.rows[(owner_hash("a"), "pay-1")] = "c2.r-pay-1"  # a's, from before a restart
    ran = await group.c2.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="b")
    assert ran.txid.startswith("c2.")
    assert ran.txid != "c2.r-pay-1"
    assert group.claims.rows[(owner_hash("b"), "pay-1")] == ran.txid
    again = await group.c2.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="b")
    assert again.txid == ran.txid


@scenario
async def test_nothing_runs_when_the_store_does_not_answer_and_a_refusal_drops_the_claim() -> None:
    group = make_group(max_active=0)
    group.claims.down = True
    with pytest.raises(Unavailable, match="does not answer"):
        await group.c2.run(WORK, timeout_ms=5_000, request_id="pay-9", owner="a")
    assert group.ports.calls == []
    group.claims.down = False
    with pytest.raises(Exception, match="max_active"):
        await group.c2.begin_request(5_000, "pay-9", owner="a")
    assert group.claims.rows == {}  # refused before anything ran: a retry elsewhere may run it


def _row(holder: str, remaining_ms: int) -> LeaseRow:
    return LeaseRow("c1", holder, 3, datetime.datetime.now(datetime.UTC), remaining_ms)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (None, Standing.RESOLVED),
        (_row("", 0), Standing.RESOLVED),
        (_row("member-a", 900), Standing.LIVE),
        (_row("member-a", 0), Standing.DUE),
        (_row("member-b", 900), Standing.RESOLVED),
        (_row("member-b", 0), Standing.DUE),
    ],
)
def test_where_an_id_stands(row: LeaseRow | None, expected: Standing) -> None:
    assert standing_of(row, "member-b").standing is expected


def test_owners_are_stored_as_fixed_length_hashes() -> None:
    assert owner_hash("client") != owner_hash("other-app")
    assert {len(owner_hash(o)) for o in ("a", "x" * 300, None)} == {64}


@scenario
async def test_after_a_restart_the_store_tells_whose_a_request_ids_own_txid_is() -> None:
    """c1 restarted: its log replays c1.r-pay-1 with no owner; the claim says it is a's."""
    ports = FakeParticipants(("eu", "us"))
    claims = FakeClaims()
    claims.rows[(owner_hash("a"), "pay-1")] = "c1.r-pay-1"
    manager = TransactionManager(
        SETTINGS,
        ports,
        InMemoryDecisionLog(replay=Replay(ended={"c1.r-pay-1"})),
        clock=FakeClock(),
        claims=claims,
    )
    await manager.start()
    with pytest.raises(NotFound):
        await manager.lookup("c1.r-pay-1", owner="b")
    unused = await manager.lookup_request("pay-1", owner="b")
    assert (unused.state, unused.presumed) == (TxState.ABORTED, True)
    assert (await manager.lookup_request("pay-1", owner="a")).state is TxState.COMMITTED
    own = await manager.run(WORK, timeout_ms=5_000, request_id="pay-1", owner="b")
    assert own.txid != "c1.r-pay-1"
    assert claims.rows[(owner_hash("b"), "pay-1")] == own.txid
    with pytest.raises(FailedPrecondition, match="already ran"):
        await manager.begin_request(5_000, "pay-1", owner="a")
