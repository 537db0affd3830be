"""The flash sale's PNG: orders per second and p99 per mode, and the outage run's timeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot"]


def plot(results: Sequence[Any], path: Path) -> bool:
    """Draws ``results`` (``ModeResult``) to ``path``; False when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 (only this command needs it)
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sale = [r for r in results if r.run == "sale"]
    outage = [r for r in results if r.run == "outage"]
    panels = 3 if outage else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), layout="constrained")
    names = [r.mode for r in sale]
    axes[0].bar(names, [r.orders_per_s for r in sale], color="#1f77b4")
    axes[0].set_title("orders per second while stock lasted")
    axes[1].bar(names, [r.p99_ms or 0 for r in sale], color="#d62728")
    axes[1].set_title("p99 of a purchase (ms)")
    for axis in axes[:2]:
        axis.tick_params(axis="x", labelrotation=20)
    if outage:
        for r in outage:
            times = [t for t, _, _ in r.timeline]
            (line,) = axes[2].plot(times, [n for _, _, n in r.timeline], label=r.mode)
            if r.mode == "mq-outbox":  # sold in the stock region, not yet in the wallet's
                axes[2].plot(
                    times,
                    [sold for _, sold, _ in r.timeline],
                    linestyle="--",
                    color=line.get_color(),
                    label="mq-outbox: sold (stock region)",
                )
        axes[2].set_title("outage run: orders in the wallet region")
        axes[2].set_xlabel("s")
        axes[2].legend()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
