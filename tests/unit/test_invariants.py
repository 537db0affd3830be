"""The invariant checker of ``twopc chaos`` and ``twopc demo``, judged on hand-made states.

``judge_bank`` is pure: each test builds what the databases would hold and what the clients saw,
and every verdict must break on exactly the states that break its invariant.
tests/integration/test_invariant_checks.py makes the same states on real MariaDB servers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set

import pytest

from twopc.client import NotFound, Outcome, TransactionInfo, TransactionState
from twopc.testing.chaos.report import ChaosResult
from twopc.testing.playground.bank import ABORTED, COMMITTED, UNKNOWN, Transfer
from twopc.testing.playground.invariants import (
    BankState,
    Verdict,
    agents_liveness,
    judge_bank,
    resolve_unknown,
)

I1, I2, I3, I5, I6, I7 = (
    "I1 atomicity",
    "I2 no lost commit",
    "I3 honest abort",
    "I5 liveness",
    "I6 unknown outcomes resolvable",
    "I7 conservation",
)
TOTAL = 4000


def transfer(n: int, outcome: str, regions: tuple[str, str] = ("eu", "us")) -> Transfer:
    return Transfer(
        request_id=f"t{n}",
        txid=f"c1.r-t{n}",
        source=(regions[0], 1),
        target=(regions[1], 2),
        amount=10,
        outcome=outcome,
    )


def judge(
    transfers: Sequence[Transfer],
    applied: Mapping[str, Set[str]],
    *,
    prepared: Mapping[str, Sequence[str]] | None = None,
    total: int = TOTAL,
    resolved: Mapping[str, str] | None = None,
) -> list[Verdict]:
    state = BankState(
        applied={"eu": set(), "us": set(), **applied},
        prepared=prepared or {"eu": [], "us": []},
        total=total,
    )
    return judge_bank(transfers, state, expected_total=TOTAL, resolved=resolved or {})


def broken(verdicts: Sequence[Verdict]) -> dict[str, list[str]]:
    return {v.name: v.offenders for v in verdicts if not v.holds}


def test_a_clean_run_keeps_every_invariant() -> None:
    both, local = transfer(1, COMMITTED), transfer(2, COMMITTED, ("eu", "eu"))
    aborted, unknown_committed, unknown_aborted = (
        transfer(3, ABORTED),
        transfer(4, UNKNOWN),
        transfer(5, UNKNOWN),
    )
    verdicts = judge(
        [both, local, aborted, unknown_committed, unknown_aborted],
        {
            "eu": {both.txid, local.txid, unknown_committed.txid},
            "us": {both.txid, unknown_committed.txid},
        },
        resolved={unknown_committed.txid: COMMITTED, unknown_aborted.txid: ABORTED},
    )
    assert [v.name for v in verdicts] == [I1, I2, I3, I5, I6, I7]
    assert broken(verdicts) == {}
    assert [str(v) for v in verdicts] == [
        "I1 atomicity: holds - 0 transfers applied in one region only",
        "I2 no lost commit: holds - 0 transfers seen COMMITTED but not applied everywhere",
        "I3 honest abort: holds - 0 transfers seen ABORTED but applied somewhere",
        "I5 liveness: holds - 0 prepared branches left",
        "I6 unknown outcomes resolvable: holds - 2 unknown outcomes, 0 not resolved to what "
        "was applied",
        "I7 conservation: holds - total 4000, expected 4000",
    ]


@pytest.mark.parametrize(
    ("outcome", "resolved", "also"),
    [
        (COMMITTED, None, I2),
        (ABORTED, None, I3),
        (UNKNOWN, COMMITTED, I6),
        (UNKNOWN, ABORTED, I6),
    ],
)
def test_a_half_applied_transfer_breaks_atomicity_and_what_its_client_was_told(
    outcome: str, resolved: str | None, also: str
) -> None:
    half = transfer(1, outcome)
    verdicts = judge(
        [half, transfer(2, COMMITTED)],
        {"eu": {half.txid, "c1.r-t2"}, "us": {"c1.r-t2"}},
        resolved={half.txid: resolved} if resolved else {},
    )
    assert broken(verdicts) == {I1: [half.txid], also: [half.txid]}


def test_a_commit_applied_nowhere_is_a_lost_commit() -> None:
    lost, local = transfer(1, COMMITTED), transfer(2, COMMITTED, ("us", "us"))
    assert broken(judge([lost, local], {})) == {I2: [lost.txid, local.txid]}


def test_an_abort_applied_everywhere_is_a_phantom_abort() -> None:
    phantom = transfer(1, ABORTED)
    verdicts = judge([phantom], {"eu": {phantom.txid}, "us": {phantom.txid}})
    assert broken(verdicts) == {I3: [phantom.txid]}


def test_a_prepared_branch_left_anywhere_breaks_liveness() -> None:
    verdicts = judge([transfer(1, ABORTED)], {}, prepared={"eu": [], "us": ["c1.r-t1"]})
    assert broken(verdicts) == {I5: ["us:c1.r-t1"]}
    assert str(verdicts[3]) == "I5 liveness: BROKEN - 1 prepared branches left (e.g. us:c1.r-t1)"


def test_money_created_or_lost_breaks_conservation() -> None:
    assert broken(judge([], {}, total=TOTAL + 1)) == {I7: []}
    assert broken(judge([], {}, total=TOTAL - 1)) == {I7: []}
    assert (
        str(judge([], {}, total=3990)[5]) == "I7 conservation: BROKEN - total 3990, expected 4000"
    )


@pytest.mark.parametrize(
    ("applied", "resolved"),
    [
        (True, ABORTED),  # the lookup says aborted; it was applied everywhere
        (False, COMMITTED),  # the lookup says committed; nothing was applied
        (False, "still pending"),  # never resolved
        (False, "lookup failed: no transaction c1.r-t1"),
        (False, None),  # never looked up
    ],
)
def test_an_unknown_outcome_resolved_to_what_was_not_applied_breaks_i6(
    applied: bool, resolved: str | None
) -> None:
    unknown = transfer(1, UNKNOWN)
    where = {"eu": {unknown.txid}, "us": {unknown.txid}} if applied else {}
    verdicts = judge([unknown], where, resolved={unknown.txid: resolved} if resolved else {})
    assert broken(verdicts) == {I6: [unknown.txid]}
    assert verdicts[4].detail == "1 unknown outcomes, 1 not resolved to what was applied"


def test_lookups_of_outcomes_the_client_saw_do_not_count() -> None:
    seen = transfer(1, COMMITTED)
    verdicts = judge([seen], {"eu": {seen.txid}, "us": {seen.txid}}, resolved={seen.txid: ABORTED})
    assert broken(verdicts) == {}


def test_offenders_name_each_broken_transfer_once() -> None:
    transfers = [transfer(n, COMMITTED) for n in range(5)]
    verdicts = judge(transfers, {"eu": {"c1.r-t0", "c1.r-t3"}, "us": {"c1.r-t0"}})
    assert broken(verdicts) == {
        I1: ["c1.r-t3"],
        I2: ["c1.r-t1", "c1.r-t2", "c1.r-t3", "c1.r-t4"],
    }
    assert str(verdicts[1]) == (
        "I2 no lost commit: BROKEN - 4 transfers seen COMMITTED but not applied everywhere "
        "(e.g. c1.r-t1, c1.r-t2, c1.r-t3)"
    )


@pytest.mark.parametrize(
    ("held", "quiescence_s", "holds"),
    [
        ([], 0.4, True),
        (["agent-us: 1 active, 0 prepared"], 0.4, False),
        (["agent-eu: not answering"], 0.4, False),
        ([], 120.0, False),  # quiescence never came within the deadline
    ],
)
def test_the_agents_liveness_verdict(held: list[str], quiescence_s: float, holds: bool) -> None:
    verdict = agents_liveness(held, quiescence_s, 120.0)
    assert (verdict.name, verdict.holds, verdict.offenders) == ("I5 liveness (agents)", holds, held)
    assert verdict.detail == (
        f"{len(held)} agent(s) holding branches or not answering {quiescence_s:.1f} s after "
        "the heal"
    )


class LookupStub:
    """GetTransaction answers by request id: an outcome, or NotFound."""

    def __init__(self, outcomes: Mapping[str, Outcome]) -> None:
        self.outcomes = outcomes
        self.asked: list[str] = []

    def get_transaction(self, *, request_id: str) -> TransactionInfo:
        self.asked.append(request_id)
        if request_id not in self.outcomes:
            raise NotFound(f"no transaction for request {request_id}")
        return TransactionInfo(
            txid=f"c1.r-{request_id}",
            state=TransactionState.ACTIVE,
            outcome=self.outcomes[request_id],
            participants=["eu", "us"],
            abort_reason="",
            presumed=False,
        )


def test_unknown_outcomes_are_resolved_by_lookup_and_only_those() -> None:
    transfers = [transfer(1, UNKNOWN), transfer(2, UNKNOWN), transfer(3, UNKNOWN)]
    transfers += [transfer(4, UNKNOWN), transfer(5, COMMITTED), transfer(6, ABORTED)]
    stub = LookupStub({"t1": Outcome.COMMITTED, "t2": Outcome.ABORTED, "t3": Outcome.PENDING})
    resolved = resolve_unknown(stub, transfers)  # a stub: resolve_unknown only looks up
    assert stub.asked == ["t1", "t2", "t3", "t4"]
    assert resolved == {
        "c1.r-t1": COMMITTED,
        "c1.r-t2": ABORTED,
        "c1.r-t3": "still pending",
        "c1.r-t4": "lookup failed: no transaction for request t4",
    }


def chaos_result(verdicts: list[Verdict]) -> ChaosResult:
    return ChaosResult(
        seed=7,
        duration=10.0,
        regions=["eu", "us"],
        transfers=[],
        faults=[],
        resolved={},
        verdicts=verdicts,
        quiescence_s=0.5,
        began_at=0.0,
    )


def test_the_chaos_report_fails_when_any_verdict_is_broken() -> None:
    good = judge([], {})
    bad = [*good[:5], Verdict(I7, False, "total 3990, expected 4000")]
    passed, failed = chaos_result(good), chaos_result(bad)
    assert passed.ok
    assert passed.summary().endswith(
        "  I7 conservation: holds - total 4000, expected 4000\n  ALL INVARIANTS HOLD"
    )
    assert not failed.ok
    assert failed.summary().endswith(
        "  I7 conservation: BROKEN - total 3990, expected 4000\n  INVARIANT BROKEN"
    )
    report = failed.as_json()
    assert report["ok"] is False
    assert report["invariants"] == [
        {"name": v.name, "holds": v.holds, "detail": v.detail, "offenders": v.offenders}
        for v in bad
    ]
