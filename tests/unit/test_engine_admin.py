"""The operator's hand (``coordinator.engine.admin``) against fakes: every row of resolve's rules
(proto/PROTOCOL.md, The operator's hand), the audit record written before the action, drain,
and the listing's bounds. No database, no gRPC."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.decision_log import CommitRecord, Replay
from coordinator.engine.admin import MAX_REASON, Operator, Verdict
from coordinator.engine.states import TxState
from participants.branches import BranchState
from tests.unit.test_engine import READ, WRITE, Env, make_env, scenario, until
from twopc.errors import FailedPrecondition, InvalidArgument, TransactionAborted, Unavailable

OWN = "c1.r-admin-own"
FOREIGN = "c9.r-admin-stray"


def operator(env: Env) -> Operator:
    return Operator(env.manager, rpc_timeout=1.0)


def outcomes(env: Env) -> list[str]:
    return [f"{a.action} {a.txid} {a.outcome.split(':')[0]}" for a in env.log.audits]


async def started(replay: Replay | None = None) -> Env:
    env = make_env(replay=replay)
    await env.manager.start()
    return env


@scenario
async def test_abort_of_a_logged_commit_is_refused_and_commit_drives_phase_2() -> None:
    env = await started(Replay(open_commits=[CommitRecord(OWN, ("eu", "us"))]))
    for region in ("eu", "us"):
        env.ports.seed(region, OWN, BranchState.PREPARED)
    admin = operator(env)
    with pytest.raises(FailedPrecondition, match=r"COMMIT record is in the log \(eu, us\)"):
        await admin.resolve(OWN, Verdict.ABORT, "OPS-1", "admin")
    assert env.ports.calls_of("rollback") == []
    done = await admin.resolve(OWN, Verdict.COMMIT, "OPS-2", "admin")
    assert done.state is TxState.COMMITTED
    assert {env.ports.state(r, OWN) for r in ("eu", "us")} == {BranchState.COMMITTED}
    assert env.log.ends == [OWN]
    assert outcomes(env) == [f"resolve {OWN} refused abort", f"resolve {OWN} commit"]
    # The commit's audit record was durable before its first XA COMMIT went out.
    assert env.log.audited_at[1] <= min(env.ports.indexes_of("commit", OWN))


@scenario
async def test_no_decision_is_presumed_abort_only_abort_is_allowed() -> None:
    env = await started()
    env.ports.seed("eu", OWN, BranchState.PREPARED)
    env.ports.seed("us", OWN, BranchState.ACTIVE)
    admin = operator(env)
    with pytest.raises(FailedPrecondition, match="presumed aborted, so only --abort"):
        await admin.resolve(OWN, Verdict.COMMIT, "OPS-3", "admin")
    assert env.ports.calls_of("commit") == []
    done = await admin.resolve(OWN, Verdict.ABORT, "OPS-3", "admin")
    assert done.state is TxState.ABORTED
    assert env.ports.state("eu", OWN) is BranchState.ROLLED_BACK
    assert env.ports.state("us", OWN) is BranchState.ROLLED_BACK
    assert outcomes(env) == [f"resolve {OWN} refused commit", f"resolve {OWN} abort"]


@scenario
async def test_abort_is_refused_where_a_branch_committed_in_one_phase() -> None:
    env = await started()
    env.ports.seed("eu", OWN, BranchState.COMMITTED)
    with pytest.raises(FailedPrecondition, match="committed on eu"):
        await operator(env).resolve(OWN, Verdict.ABORT, "OPS-4", "admin")
    assert env.ports.calls_of("rollback") == []


@scenario
async def test_a_live_active_transaction_is_aborted_and_its_client_told_why() -> None:
    env = await started()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    admin = operator(env)
    with pytest.raises(FailedPrecondition, match="presumed aborted"):
        await admin.resolve(tx.txid, Verdict.COMMIT, "OPS-5", "admin")
    done = await admin.resolve(tx.txid, Verdict.ABORT, "OPS-5: holds locks", "ops")
    assert done.state is TxState.ABORTED
    assert {env.ports.state(r, tx.txid) for r in ("eu", "us")} == {BranchState.ROLLED_BACK}
    with pytest.raises(TransactionAborted, match="aborted by operator 'ops': OPS-5: holds locks"):
        await env.manager.execute(tx.txid, "eu", [READ], 3)


@scenario
async def test_a_decision_being_made_is_refused_with_try_again() -> None:
    env = await started()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    gate = env.ports.hold("prepare", "us")
    commit = asyncio.create_task(env.manager.commit(tx.txid, wait_for_phase2=True))
    await until(gate.entered.is_set, "the prepare held")
    assert tx.state is TxState.PREPARING
    for verdict in Verdict:
        with pytest.raises(Unavailable, match="try again"):
            await operator(env).resolve(tx.txid, verdict, "OPS-6", "admin")
    gate.release()
    assert await commit is TxState.COMMITTED
    assert outcomes(env) == [
        f"resolve {tx.txid} refused commit",
        f"resolve {tx.txid} refused abort",
    ]


@scenario
async def test_another_coordinators_branches_are_concluded_the_commit_logged_first() -> None:
    env = await started()
    for region in ("eu", "us"):
        env.ports.seed(region, FOREIGN, BranchState.PREPARED)
    admin = operator(env)
    listing = await admin.listing(coordinator_id="c9")
    assert [(d.txid, d.prepared_on, d.commit_logged) for d in listing.in_doubt] == [
        (FOREIGN, ("eu", "us"), False)
    ]
    done = await admin.resolve(FOREIGN, Verdict.COMMIT, "OPS-7: c9 retired", "admin")
    assert done.state is TxState.COMMITTED
    assert env.log.commits == [CommitRecord(FOREIGN, ("eu", "us"))]
    assert env.log.durable_at[FOREIGN] <= min(env.ports.indexes_of("commit", FOREIGN))
    with pytest.raises(FailedPrecondition, match="refusing to abort"):
        await admin.resolve(FOREIGN, Verdict.ABORT, "OPS-7", "admin")


@scenario
async def test_another_coordinators_branch_that_committed_somewhere_is_not_aborted() -> None:
    env = await started()
    env.ports.seed("eu", FOREIGN, BranchState.COMMITTED)
    env.ports.seed("us", FOREIGN, BranchState.PREPARED)
    with pytest.raises(FailedPrecondition, match="committed on eu"):
        await operator(env).resolve(FOREIGN, Verdict.ABORT, "OPS-8", "admin")
    assert env.ports.state("us", FOREIGN) is BranchState.PREPARED


@scenario
async def test_an_agent_that_cannot_be_asked_stops_a_resolve() -> None:
    env = await started()
    env.ports.seed("eu", FOREIGN, BranchState.PREPARED)
    env.ports.fail("inspect", "ap", Unavailable("down"))
    with pytest.raises(Unavailable, match="ap could not be asked"):
        await operator(env).resolve(FOREIGN, Verdict.COMMIT, "OPS-9", "admin")
    assert env.log.commits == []
    assert env.ports.state("eu", FOREIGN) is BranchState.PREPARED


@pytest.mark.parametrize("reason", ["", "   ", "x" * (MAX_REASON + 1), "two\nlines", "tab\there"])
@scenario
async def test_a_reason_is_required_short_and_printable(reason: str) -> None:
    env = await started()
    with pytest.raises(InvalidArgument):
        await operator(env).resolve(OWN, Verdict.ABORT, reason, "admin")
    assert env.log.audits == []


@scenario
async def test_draining_refuses_new_transactions_and_lets_live_ones_finish() -> None:
    env = await started()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    retried = env.manager.begin(5_000, "retried")
    admin = operator(env)
    await admin.drain("admin", "OPS-10")
    assert env.manager.draining
    with pytest.raises(Unavailable, match="is draining"):
        env.manager.begin(5_000)
    with pytest.raises(Unavailable, match="use another coordinator"):
        await env.manager.run([("eu", [WRITE])], timeout_ms=5_000)
    assert env.manager.begin(5_000, "retried") is retried  # a retry is no new transaction
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    await admin.undrain("admin")
    assert not env.manager.draining
    env.manager.begin(5_000)
    assert outcomes(env) == ["drain  draining", "undrain  admitting"]


@scenario
async def test_the_listing_is_bounded_and_names_holders() -> None:
    env = await started()
    for n in range(5):
        env.ports.seed("eu", f"c1.r-doubt-{n}", BranchState.PREPARED)
    live = [env.manager.begin(5_000, f"live-{n}", owner=f"app-{n}") for n in range(3)]
    listing = await operator(env).listing(limit=2)
    assert [(e.txid, e.holder) for e in listing.live] == [(t.txid, t.owner) for t in live[:2]]
    assert [d.txid for d in listing.in_doubt] == ["c1.r-doubt-0", "c1.r-doubt-1"]
    assert listing.truncated
    assert listing.live_count == 3
    with pytest.raises(InvalidArgument):
        await operator(env).listing(limit=10_001)


@scenario
async def test_show_tells_the_holder_the_branches_and_the_audit_of_a_finished_transaction() -> None:
    env = await started()
    tx = env.manager.begin(5_000, owner="shop")
    await env.manager.execute(tx.txid, "eu", [WRITE], 1)
    admin = operator(env)
    await admin.resolve(tx.txid, Verdict.ABORT, "OPS-11", "admin")
    report = await admin.show(tx.txid)
    assert (report.live, report.view.owner, report.view.state) == (False, "shop", TxState.ABORTED)
    assert {b.participant: b.presence.name for b in report.branches if b.presence} == {
        "eu": "ROLLED_BACK",
        "us": "UNKNOWN",
        "ap": "UNKNOWN",
    }
    assert [(a.identity, a.outcome, a.reason) for a in report.audits] == [
        ("admin", "abort", "OPS-11")
    ]
