"""The invariants of proto/PROTOCOL.md, checked on the databases themselves.

The marker rows tell which branches committed: a transfer's branch committed in a region exactly
when that region's marker table holds a row for its txid. XA RECOVER tells what is still prepared.

Reading and judging are apart. ``committed_markers`` and ``prepared_branches`` read the databases;
``judge_bank`` is a pure function from what they hold (a ``BankState``) and what the clients saw
to one verdict per invariant; ``check_bank`` does both, for ``twopc chaos`` and ``twopc demo``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field

from twopc.client import Client, Outcome
from twopc.errors import TwopcError
from twopc.testing.playground.bank import ABORTED, COMMITTED, UNKNOWN, Databases, Transfer
from twopc.txid import Xid

MARKER_TABLE = "twopc_branch_marker"


@dataclass
class Verdict:
    name: str
    holds: bool
    detail: str
    offenders: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mark = "holds" if self.holds else "BROKEN"
        extra = f" (e.g. {', '.join(self.offenders[:3])})" if self.offenders else ""
        return f"{self.name}: {mark} - {self.detail}{extra}"


@dataclass(frozen=True)
class BankState:
    """What the databases hold once a bank run is quiescent.

    Attributes:
        applied: per region, the txids whose branch committed there (their marker rows).
        prepared: per region, the txids of twopc's branches that XA RECOVER still lists.
        total: the sum of all balances in every region.
    """

    applied: Mapping[str, Set[str]]
    prepared: Mapping[str, Sequence[str]]
    total: int


def committed_markers(databases: Databases, txids: Iterable[str]) -> dict[str, set[str]]:
    """Per region, the txids (among ``txids``) whose branch committed there."""
    wanted = sorted(set(txids))
    found: dict[str, set[str]] = {}
    for region in databases.regions:
        found[region] = set()
        with databases.mysql(region) as conn, conn.cursor() as cursor:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                if not chunk:
                    continue
                marks = ", ".join(["%s"] * len(chunk))
                cursor.execute(
                    f"SELECT gtrid FROM {MARKER_TABLE} WHERE gtrid IN ({marks})",
                    [t.encode() for t in chunk],
                )
                found[region].update(bytes(row[0]).decode() for row in cursor.fetchall())
    return found


def prepared_branches(databases: Databases) -> dict[str, list[str]]:
    """Per region, the txids of twopc's branches that XA RECOVER still lists (any other
    branch on the server is not twopc's: ``Xid.from_recover_row`` tells)."""
    result: dict[str, list[str]] = {}
    for region in databases.regions:
        with databases.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute("XA RECOVER")
            xids = (
                Xid.from_recover_row(int(format_id), int(gtrid_length), bytes(data))
                for format_id, gtrid_length, _bqual_length, data in cursor.fetchall()
            )
            result[region] = [xid.txid for xid in xids if xid is not None]
    return result


def resolve_unknown(client: Client, transfers: Sequence[Transfer]) -> dict[str, str]:
    """For transfers whose outcome the client did not see: what GetTransaction says now (I6)."""
    resolved: dict[str, str] = {}
    for transfer in transfers:
        if transfer.outcome != UNKNOWN:
            continue
        try:
            info = client.get_transaction(request_id=transfer.request_id)
        except TwopcError as err:
            resolved[transfer.txid] = f"lookup failed: {err.message}"
            continue
        resolved[transfer.txid] = {
            Outcome.COMMITTED: COMMITTED,
            Outcome.ABORTED: ABORTED,
        }.get(info.outcome, f"still {info.outcome.name.lower()}")
    return resolved


def check_bank(
    databases: Databases,
    transfers: Sequence[Transfer],
    *,
    expected_total: int,
    actual_total: int,
    resolved: Mapping[str, str],
) -> list[Verdict]:
    """Reads the marker rows of ``transfers`` and what is still prepared, then judges."""
    state = BankState(
        applied=committed_markers(databases, (t.txid for t in transfers)),
        prepared=prepared_branches(databases),
        total=actual_total,
    )
    return judge_bank(transfers, state, expected_total=expected_total, resolved=resolved)


def judge_bank(
    transfers: Sequence[Transfer],
    state: BankState,
    *,
    expected_total: int,
    resolved: Mapping[str, str],
) -> list[Verdict]:
    """I1-I3 and I5-I7 on a quiescent bank: pure, from what the databases hold and what each
    client saw (``resolved``: what the lookup answered for each transfer seen UNKNOWN)."""

    def applied(transfer: Transfer) -> list[bool]:
        return [transfer.txid in state.applied.get(region, ()) for region in transfer.regions]

    def lookup_wrong(transfer: Transfer) -> bool:
        answer = resolved.get(transfer.txid)
        if answer == COMMITTED:
            return not all(applied(transfer))
        if answer == ABORTED:
            return any(applied(transfer))
        return True  # no answer: not looked up, the lookup failed, or the outcome is pending

    half = [t.txid for t in transfers if len(set(applied(t))) > 1]
    lost = [t.txid for t in transfers if t.outcome == COMMITTED and not all(applied(t))]
    dishonest = [t.txid for t in transfers if t.outcome == ABORTED and any(applied(t))]
    still_prepared = [f"{r}:{txid}" for r, txids in state.prepared.items() for txid in txids]
    wrong_lookup = [t.txid for t in transfers if t.outcome == UNKNOWN and lookup_wrong(t)]
    unknown = sum(t.outcome == UNKNOWN for t in transfers)
    return [
        Verdict(
            "I1 atomicity", not half, f"{len(half)} transfers applied in one region only", half
        ),
        Verdict(
            "I2 no lost commit",
            not lost,
            f"{len(lost)} transfers seen COMMITTED but not applied everywhere",
            lost,
        ),
        Verdict(
            "I3 honest abort",
            not dishonest,
            f"{len(dishonest)} transfers seen ABORTED but applied somewhere",
            dishonest,
        ),
        Verdict(
            "I5 liveness",
            not still_prepared,
            f"{len(still_prepared)} prepared branches left",
            still_prepared,
        ),
        Verdict(
            "I6 unknown outcomes resolvable",
            not wrong_lookup,
            f"{unknown} unknown outcomes, {len(wrong_lookup)} not resolved to what was applied",
            wrong_lookup,
        ),
        Verdict(
            "I7 conservation",
            expected_total == state.total,
            f"total {state.total}, expected {expected_total}",
        ),
    ]


def agents_liveness(held: Sequence[str], quiescence_s: float, deadline_s: float) -> Verdict:
    """I5 as the agents see it (``twopc chaos``): none holds a branch, and the cluster became
    quiescent within ``deadline_s`` of the last heal. ``held`` names each agent that holds a
    branch or does not answer."""
    return Verdict(
        "I5 liveness (agents)",
        not held and quiescence_s < deadline_s,
        f"{len(held)} agent(s) holding branches or not answering "
        f"{quiescence_s:.1f} s after the heal",
        list(held),
    )
