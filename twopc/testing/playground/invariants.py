"""The invariants of PROTOCOL.md, checked on the databases themselves.

The marker rows tell which branches committed: a transfer's branch committed in a region exactly
when that region's marker table holds a row for its txid. XA RECOVER tells what is still prepared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from twopc.client import Client, Outcome
from twopc.errors import TwopcError
from twopc.testing.playground.bank import ABORTED, COMMITTED, UNKNOWN, Transfer
from twopc.testing.playground.cluster import Cluster
from twopc.txid import FORMAT_ID

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


def committed_markers(cluster: Cluster, txids: Iterable[str]) -> dict[str, set[str]]:
    """Per region, the txids (among ``txids``) whose branch committed there."""
    wanted = sorted(set(txids))
    found: dict[str, set[str]] = {}
    for region in cluster.regions:
        found[region] = set()
        with cluster.mysql(region) as conn, conn.cursor() as cursor:
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


def prepared_branches(cluster: Cluster) -> dict[str, list[str]]:
    """Per region, the txids of twopc's branches that XA RECOVER still lists."""
    result: dict[str, list[str]] = {}
    for region in cluster.regions:
        with cluster.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute("XA RECOVER")
            result[region] = [
                bytes(data[:gtrid_length]).decode(errors="replace")
                for format_id, gtrid_length, _bqual_length, data in cursor.fetchall()
                if int(format_id) == FORMAT_ID
            ]
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
    cluster: Cluster,
    transfers: Sequence[Transfer],
    *,
    expected_total: int,
    actual_total: int,
    resolved: Mapping[str, str],
) -> list[Verdict]:
    markers = committed_markers(cluster, (t.txid for t in transfers))
    prepared = prepared_branches(cluster)

    def applied(transfer: Transfer) -> list[bool]:
        return [transfer.txid in markers[region] for region in transfer.regions]

    half = [t.txid for t in transfers if len(set(applied(t))) > 1]
    lost = [t.txid for t in transfers if t.outcome == COMMITTED and not all(applied(t))]
    dishonest = [t.txid for t in transfers if t.outcome == ABORTED and any(applied(t))]
    still_prepared = [f"{r}:{txid}" for r, txids in prepared.items() for txid in txids]
    wrong_lookup = [
        t.txid
        for t in transfers
        if t.outcome == UNKNOWN
        and (
            resolved.get(t.txid) not in (COMMITTED, ABORTED)
            or (resolved[t.txid] == COMMITTED) != all(applied(t))
        )
    ]
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
            expected_total == actual_total,
            f"total {actual_total}, expected {expected_total}",
        ),
    ]
