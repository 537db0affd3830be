"""The benchmark's PNG: per workload and round trip, throughput and p99 latency against concurrency.

One row of two panels per (workload, round trip): throughput (committed transactions/s) on the
left, p99 latency (ms, log scale) on the right; concurrency on a log-2 axis; one line per system.
matplotlib is imported only here, lazily, with the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_cells", "series"]

_COLOURS = {
    "twopc": "#d62728",
    "twopc-ordered": "#ff7f0e",
    "twopc-adaptive": "#9467bd",
    "direct-xa": "#1f77b4",
    "sqla-twophase": "#2ca02c",
    "local": "#7f7f7f",
}


def series(
    cells: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, int], dict[str, list[tuple[int, float, float | None]]]]:
    """(workload, rtt) -> system -> [(concurrency, tps, p99 ms)], sorted by concurrency."""
    grouped: dict[tuple[str, int], dict[str, list[tuple[int, float, float | None]]]] = {}
    for cell in cells:
        key = (str(cell["workload"]), int(cell["rtt_ms"]))
        points = grouped.setdefault(key, {}).setdefault(str(cell["system"]), [])
        points.append((int(cell["concurrency"]), float(cell["tps"]), cell["latency_ms"]["p99"]))
    for systems in grouped.values():
        for points in systems.values():
            points.sort()
    return grouped


def plot_cells(cells: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> bool:
    """Draws the PNG of ``cells`` (``CellResult.as_json`` dicts) to ``path``. Returns False,
    having drawn nothing, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415 (only the bench command needs it)
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    grouped = series(cells)
    rows = max(len(grouped), 1)
    figure, axes = plt.subplots(
        rows, 2, figsize=(12, 3.2 * rows), squeeze=False, layout="constrained"
    )
    for row, ((workload, rtt), systems) in enumerate(grouped.items()):
        left, right = axes[row]
        for system, points in systems.items():
            colour = _COLOURS.get(system)
            xs = [p[0] for p in points]
            left.plot(xs, [p[1] for p in points], marker="o", label=system, color=colour)
            p99 = [(p[0], p[2]) for p in points if p[2] is not None]
            right.plot(
                [x for x, _ in p99], [y for _, y in p99], marker="o", label=system, color=colour
            )
        concurrency = sorted({p[0] for points in systems.values() for p in points})
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            axis.set_xticks(concurrency, [str(c) for c in concurrency])
            axis.minorticks_off()
            axis.set_xlabel("concurrent clients")
            axis.grid(True, which="major", alpha=0.3)
        left.set_ylabel("committed tx/s")
        left.set_ylim(bottom=0)
        right.set_ylabel("p99 latency (ms)")
        right.set_yscale("log")
        left.set_title(f"{workload}, {rtt} ms RTT: throughput", fontsize=9)
        right.set_title(f"{workload}, {rtt} ms RTT: p99 latency", fontsize=9)
        left.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
