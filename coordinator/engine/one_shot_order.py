"""How a one-shot transaction's branches are prepared: all at once, or one after another.

In parallel (one round trip), two one-shot transactions that cross hot rows in different regions
can each lock one row and wait for the other's: a lock cycle that the deadlock detector breaks by
aborting one of them. In order (participant-name order, one more round trip per participant),
every transaction takes its locks in the same order and no cycle can form. Which is faster
depends on how often cycles form, measured on this machine (``deploy/bench-results/issue-11/run1``):
with victims at a fraction of a per cent of transactions, parallel wins (hot transfers at 8
clients: 263 against 228 tps); with a third of them victims, ordered does (32 clients: 258
against 175). So ``adaptive`` prepares in parallel and turns to ordered for ``hold_s`` when, over
a window of at least ``window_s`` and ``min_sample`` one-shot transactions, deadlock victims
were ``victim_share`` of them or more. Ordered, no cycle forms and the share drops to nothing:
after ``hold_s`` it goes back to parallel and measures again.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ONE_SHOT_ORDERS", "OneShotOrder", "Switch"]

ONE_SHOT_ORDERS = ("parallel", "ordered", "adaptive")


@dataclass(frozen=True)
class Switch:
    """A change of the adaptive order, to log: to ``ordered`` or back to parallel, and why."""

    ordered: bool
    victims: int = 0
    transactions: int = 0


class OneShotOrder:
    """The order of one-shot prepares (``mode``: one of ``ONE_SHOT_ORDERS``). Pure: the caller
    passes the monotonic time."""

    def __init__(
        self,
        mode: str,
        *,
        hold_s: float = 10.0,
        victim_share: float = 0.05,
        window_s: float = 1.0,
        min_sample: int = 20,
    ) -> None:
        if mode not in ONE_SHOT_ORDERS:
            raise ValueError(f"one_shot_order must be one of {', '.join(ONE_SHOT_ORDERS)}")
        self.mode = mode
        self._hold_s = hold_s
        self._victim_share = victim_share
        self._window_s = window_s
        self._min_sample = min_sample
        self._ordered_until = -1.0
        self._ordered = False
        self._window_start: float | None = None
        self._transactions = 0
        self._victims = 0

    def choose(self, now: float) -> tuple[bool, Switch | None]:
        """For one one-shot transaction with several participants, prepared now: whether in
        order, and the switch this choice makes (None: as before)."""
        if self.mode != "adaptive":
            return self.mode == "ordered", None
        switch = self._measure(now)
        ordered = now < self._ordered_until
        if ordered != self._ordered and switch is None:
            switch = Switch(ordered)
        self._ordered = ordered
        if not ordered:
            self._transactions += 1
        return ordered, switch

    def victim(self) -> None:
        """A one-shot transaction was aborted to break a lock cycle."""
        self._victims += 1

    def _measure(self, now: float) -> Switch | None:
        if self._window_start is None or now < self._ordered_until:
            self._restart(now)  # only parallel prepares are measured
            return None
        if now - self._window_start < self._window_s or self._transactions < self._min_sample:
            return None
        transactions, victims = self._transactions, self._victims
        self._restart(now)
        if victims < self._victim_share * transactions:
            return None
        self._ordered_until = now + self._hold_s
        self._ordered = True
        return Switch(True, victims, transactions)

    def _restart(self, now: float) -> None:
        self._window_start = now
        self._transactions = 0
        self._victims = 0
