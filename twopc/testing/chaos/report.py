"""The chaos run's report: JSON for machines, a summary for people, a PNG timeline.

The timeline has two panels over the run's seconds, throughput (commits and aborts per second)
and latency (p50 and p99 of the transfers that finished in each second), with every fault's
window shaded and labelled.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twopc.testing.chaos.injector import AppliedFault
from twopc.testing.chaos.schedule import FaultKind
from twopc.testing.playground.bank import ABORTED, COMMITTED, UNKNOWN, Transfer
from twopc.testing.playground.invariants import Verdict

_COLOURS = {
    FaultKind.KILL: "#d62728",
    FaultKind.STOP: "#9467bd",
    FaultKind.RESTART: "#8c564b",
    FaultKind.LATENCY: "#ff7f0e",
    FaultKind.CUT: "#1f77b4",
    FaultKind.HALF_OPEN: "#17becf",
    FaultKind.BLACKHOLE: "#7f7f7f",
    FaultKind.RESET: "#bcbd22",
    FaultKind.FAILPOINT: "#e377c2",
    FaultKind.SLOW_CLOCK: "#2ca02c",
}


@dataclass
class ChaosResult:
    seed: int
    duration: float
    regions: list[str]
    transfers: list[Transfer]
    faults: list[AppliedFault]
    resolved: dict[str, str]
    verdicts: list[Verdict]
    quiescence_s: float
    began_at: float  # the monotonic clock at the run's start (transfer times are on it)
    planned: int = 0  # faults in the schedule; more than were injected if the run was cut short
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v.holds for v in self.verdicts)

    def outcome_counts(self) -> Counter[str]:
        return Counter(t.outcome for t in self.transfers)

    def fault_counts(self) -> Counter[str]:
        return Counter(f.event.kind.value for f in self.faults)

    def as_json(self) -> dict[str, object]:
        resolved_counts = Counter(self.resolved.values())
        return {
            "seed": self.seed,
            "duration_s": self.duration,
            "regions": self.regions,
            "ok": self.ok,
            "operations": {
                "total": len(self.transfers),
                **{k: self.outcome_counts().get(k, 0) for k in (COMMITTED, ABORTED, UNKNOWN)},
                "unknown_resolved": dict(resolved_counts),
            },
            "faults_planned": self.planned,
            "faults_by_kind": dict(self.fault_counts()),
            "quiescence_after_last_heal_s": round(self.quiescence_s, 3),
            "invariants": [
                {"name": v.name, "holds": v.holds, "detail": v.detail, "offenders": v.offenders}
                for v in self.verdicts
            ],
            "faults": [f.as_json() for f in self.faults],
            "transactions": [
                {
                    "txid": t.txid,
                    "request_id": t.request_id,
                    "source": list(t.source),
                    "target": list(t.target),
                    "amount": t.amount,
                    "outcome": t.outcome,
                    "resolved": self.resolved.get(t.txid, t.outcome),
                    "started_s": round(t.started - self.began_at, 4),
                    "ended_s": round(t.ended - self.began_at, 4),
                    "detail": t.detail,
                }
                for t in self.transfers
            ],
            **self.extra,
        }

    def summary(self) -> str:
        outcomes = self.outcome_counts()
        latencies = [t.ended - t.started for t in self.transfers if t.outcome == COMMITTED]
        lines = [
            f"chaos run: seed {self.seed}, {self.duration:.0f} s, "
            f"regions {', '.join(self.regions)}{_transport(self.extra)}",
            f"  transactions: {len(self.transfers)} ({outcomes[COMMITTED]} committed, "
            f"{outcomes[ABORTED]} aborted, {outcomes[UNKNOWN]} unknown to the client; resolved "
            f"by lookup: {dict(Counter(self.resolved.values()))})",
        ]
        if latencies:
            lines.append(
                f"  commit latency: p50 {_percentile(latencies, 50) * 1000:.1f} ms, "
                f"p99 {_percentile(latencies, 99) * 1000:.1f} ms"
            )
        faults = ", ".join(f"{k} {n}" for k, n in sorted(self.fault_counts().items()))
        lines.append(
            f"  faults injected: {len(self.faults)} of {self.planned} planned ({faults or 'none'})"
        )
        if self.extra.get("restarted_by_supervisor"):
            lines.append(
                f"  daemons that exited by themselves (a member stepping down, ...) and were "
                f"started again, as a supervisor would: {self.extra['restarted_by_supervisor']}"
            )
        lines.append(f"  quiescent {self.quiescence_s:.2f} s after the last heal")
        lines.extend(f"  {verdict}" for verdict in self.verdicts)
        lines.append("  ALL INVARIANTS HOLD" if self.ok else "  INVARIANT BROKEN")
        return "\n".join(lines)


def _transport(extra: dict[str, object]) -> str:
    """How the run's daemons talked, when the runner recorded it (a replayed report may not)."""
    if "mutual_tls" not in extra:
        return ""
    return ", mutual TLS on every hop" if extra["mutual_tls"] else ", PLAINTEXT"


def write_json(result: ChaosResult, path: Path) -> None:
    path.write_text(json.dumps(result.as_json(), indent=1) + "\n")


def plot_timeline(result: ChaosResult, path: Path) -> bool:
    """Draws the timeline PNG (matplotlib, without a display). Returns False, having drawn
    nothing, when matplotlib is not installed: the plot is optional, the verdict is not."""
    try:
        import matplotlib  # noqa: PLC0415 (only the chaos command needs it)
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    seconds = int(result.duration) + 1
    commits = [0] * seconds
    aborts = [0] * seconds
    latencies: list[list[float]] = [[] for _ in range(seconds)]
    for transfer in result.transfers:
        second = min(int(transfer.ended - result.began_at), seconds - 1)
        if second < 0:
            continue
        if transfer.outcome == COMMITTED:
            commits[second] += 1
            latencies[second].append((transfer.ended - transfer.started) * 1000)
        else:
            aborts[second] += 1
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    xs = list(range(seconds))
    top.plot(xs, commits, label="committed/s", color="#2ca02c")
    top.plot(xs, aborts, label="aborted or unknown/s", color="#d62728")
    top.set_ylabel("transactions per second")
    p50 = [_percentile(v, 50) if v else float("nan") for v in latencies]
    p99 = [_percentile(v, 99) if v else float("nan") for v in latencies]
    bottom.plot(xs, p50, label="p50", color="#1f77b4")
    bottom.plot(xs, p99, label="p99", color="#ff7f0e")
    bottom.set_ylabel("commit latency (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds since the start")
    seen: set[FaultKind] = set()
    for fault in result.faults:
        kind = fault.event.kind
        end = max(fault.ended, fault.started + 0.2)
        for axis in (top, bottom):
            axis.axvspan(
                fault.started,
                end,
                color=_COLOURS[kind],
                alpha=0.18,
                label=kind.value if axis is top and kind not in seen else None,
            )
        seen.add(kind)
    top.legend(loc="upper right", fontsize=7, ncol=4)
    bottom.legend(loc="upper right", fontsize=7)
    verdict = "all invariants hold" if result.ok else "INVARIANT BROKEN"
    top.set_title(f"twopc chaos, seed {result.seed}: {len(result.transfers)} transfers, {verdict}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _percentile(values: Sequence[float], pct: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]
