"""Admission of new transactions: rate limits per identity, and shedding under overload.

Only a NEW transaction (Begin, RunTransaction) is ever refused here. Everything of a
transaction once admitted (Execute, Commit, Rollback, GetTransaction, phase 2) and recovery
never passes through this module: under overload the coordinator keeps finishing what it
started and refuses new work first.

Two checks, in this order, both cheap and without I/O:

1. **Rate limit per identity** (``RateLimiter``): a token bucket per caller identity (the
   certificate's Common Name; ``None``, a plaintext caller, is one anonymous identity), refilled
   at ``rate_limit_per_s`` (or the identity's override) up to ``rate_limit_burst`` tokens. A new
   transaction takes a token; without one it is refused with the time until the next token.
   One identity flooding the coordinator empties only its own bucket.
2. **Overload guard** (``OverloadGuard``): at most ``max_in_flight`` admitted transactions not
   yet decided. Past the cap a new transaction waits in a short FIFO queue for a slot, at most
   ``queue_ms``; one that would wait longer (its estimated wait, from how long a slot has been
   held lately, is beyond ``queue_ms``) is refused at once, and so is one still waiting when
   ``queue_ms`` is up. A slot is freed when its transaction is decided (commit or abort), so
   phase 2 never holds one.

Why a cap on undecided transactions and not an adaptive limit on latency: the coordinator's
throughput on a machine is flat over a wide range of concurrency, and what collapses under
overload is latency (every admitted transaction queues behind every other one, on the event
loop, the agents' pools and the databases), until transactions wait out their deadlines. A cap
bounds that queue directly; the short admission queue absorbs bursts without refusing them;
refusing early costs a refused caller one round trip. It needs no tuning loop that could
oscillate, and below the cap it costs one counter increment per transaction.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from twopc.errors import ResourceExhausted

__all__ = [
    "ADMISSION_MAX_IN_FLIGHT",
    "ADMISSION_QUEUE_MS",
    "ANONYMOUS",
    "Admission",
    "AdmissionClock",
    "OverloadGuard",
    "RateLimiter",
    "RateLimits",
    "RefusalLog",
    "Shed",
    "TokenBucket",
    "identity_name",
]

log = structlog.get_logger("twopc.coordinator.admission")
# The overload guard's defaults (coordinator.config): see the README's Rate limits and shedding.
ADMISSION_MAX_IN_FLIGHT = 0
ADMISSION_QUEUE_MS = 50
ANONYMOUS = "(anonymous)"  # how a plaintext caller, which has no identity, is named
# Buckets kept before those that are full again (so no different from a new one) are dropped.
_BUCKETS_KEPT = 4096
# The longest retry-after an overload refusal suggests.
_MAX_RETRY_AFTER_S = 5.0


class AdmissionClock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


def identity_name(identity: str | None) -> str:
    return ANONYMOUS if identity is None else identity


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` held; full at start."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        """Takes a token: 0.0 when one was there, else the seconds until one will be (nothing
        taken)."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def give_back(self, now: float) -> None:
        """Returns a token taken for a transaction that was refused afterwards."""
        self._refill(now)
        self.tokens = min(self.burst, self.tokens + 1)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True)
class RateLimits:
    """New transactions per second per identity.

    ``per_s``: every identity's rate (0: no limit); ``burst``: the most taken at once after a
    quiet time (0: one second's worth, at least 1); ``overrides``: identity -> its own rate
    (0: no limit for it), over ``per_s``. A plaintext caller is the identity ``ANONYMOUS``.
    """

    per_s: float = 0.0
    burst: int = 0
    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.per_s >= 0 and math.isfinite(self.per_s)):
            raise ValueError(f"rate_limit_per_s ({self.per_s}) must be 0 (off) or more")
        if self.burst < 0:
            raise ValueError(f"rate_limit_burst ({self.burst}) must be 0 (one second's) or more")
        for identity, rate in self.overrides.items():
            if not (isinstance(rate, int | float) and rate >= 0 and math.isfinite(rate)):
                raise ValueError(
                    f"rate_limits: the rate of identity {identity!r} ({rate!r}) must be a "
                    "number, 0 (no limit) or more"
                )

    @property
    def active(self) -> bool:
        return self.per_s > 0 or any(rate > 0 for rate in self.overrides.values())

    def rate_of(self, identity: str | None) -> float:
        return self.overrides.get(identity_name(identity), self.per_s)

    def burst_of(self, rate: float) -> float:
        return float(self.burst) if self.burst else max(1.0, float(math.ceil(rate)))


class RateLimiter:
    """A token bucket per identity (``RateLimits``), made on the identity's first call."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._buckets: dict[str | None, TokenBucket] = {}

    def take(self, identity: str | None, now: float) -> float:
        """0.0 when ``identity`` may begin a transaction now (a token taken), else the seconds
        until it may."""
        bucket = self._buckets.get(identity)
        if bucket is None:
            rate = self.limits.rate_of(identity)
            if rate <= 0:
                return 0.0
            if len(self._buckets) >= _BUCKETS_KEPT:
                self._forget_full(now)
            bucket = self._buckets[identity] = TokenBucket(rate, self.limits.burst_of(rate), now)
        return bucket.take(now)

    def give_back(self, identity: str | None, now: float) -> None:
        bucket = self._buckets.get(identity)
        if bucket is not None:
            bucket.give_back(now)

    def _forget_full(self, now: float) -> None:
        for identity in [i for i, b in self._buckets.items() if b.full(now)]:
            del self._buckets[identity]

    def __len__(self) -> int:
        return len(self._buckets)


class Shed(Exception):
    """The overload guard refused a new transaction; try again after ``retry_after_s``."""

    def __init__(self, retry_after_s: float, in_flight: int, queued: int) -> None:
        super().__init__(f"shed: {in_flight} in flight, {queued} queued")
        self.retry_after_s = retry_after_s
        self.in_flight = in_flight
        self.queued = queued


class OverloadGuard:
    """At most ``max_in_flight`` admitted transactions not yet decided; the rest wait in a FIFO
    queue for at most ``queue_ms``, or are shed (``Shed``). ``max_in_flight`` 0 turns it off
    (``admit`` always admits at once, nothing is counted)."""

    def __init__(self, max_in_flight: int, queue_ms: int, clock: AdmissionClock) -> None:
        if max_in_flight < 0 or queue_ms < 0:
            raise ValueError(
                f"admission_max_in_flight ({max_in_flight}) and admission_queue_ms ({queue_ms}) "
                "must be 0 or more"
            )
        self.max_in_flight = max_in_flight
        self.queue_s = queue_ms / 1000
        self._clock = clock
        self.in_flight = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        # How long a slot has been held lately (exponentially weighted, seconds); None until a
        # slot was freed. It estimates a queued transaction's wait.
        self._hold_s: float | None = None

    @property
    def enabled(self) -> bool:
        return self.max_in_flight > 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def estimated_wait(self, position: int) -> float:
        """Seconds until the ``position``-th in the queue (1: the first) gets a slot, from how
        long slots are held lately (0 before any was freed)."""
        if self._hold_s is None:
            return 0.0
        return position * self._hold_s / self.max_in_flight

    def _shed(self) -> Shed:
        wait = self.estimated_wait(self.queued + 1)
        retry_after = min(_MAX_RETRY_AFTER_S, max(self.queue_s, wait, 0.001))
        return Shed(retry_after, self.in_flight, self.queued)

    async def admit(self) -> float:
        """Takes a slot, waiting in the queue for one if need be; returns the monotonic time it
        was admitted at (pass it to ``release``).

        Raises:
            Shed: every slot taken and the wait would be, or was, longer than ``queue_ms``.
        """
        now = self._clock.monotonic()
        if not self.enabled:
            return now
        if self.in_flight < self.max_in_flight and not self._queue:
            self.in_flight += 1
            return now
        if self.queue_s <= 0 or self.estimated_wait(self.queued + 1) > self.queue_s:
            raise self._shed()
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(admitted)
        timer = asyncio.ensure_future(self._clock.sleep(self.queue_s))
        try:
            await asyncio.wait((admitted, timer), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller went away (cancelled): give a slot handed over back
            if admitted.done() and not admitted.cancelled():
                self._hand_over()
            raise
        finally:
            timer.cancel()
            if not admitted.done():
                self._queue.remove(admitted)
                admitted.cancel()
        if admitted.cancelled():  # waited out queue_ms, or the caller went away
            raise self._shed()
        return self._clock.monotonic()  # release() handed its slot over: in_flight unchanged

    def release(self, admitted_at: float) -> None:
        """Frees the slot taken at ``admitted_at``: to the first in the queue, if any."""
        if not self.enabled:
            return
        held = max(0.0, self._clock.monotonic() - admitted_at)
        self._hold_s = held if self._hold_s is None else 0.9 * self._hold_s + 0.1 * held
        self._hand_over()

    def cancel(self, admitted_at: float) -> None:
        """Frees a slot whose transaction never began (not counted in the hold estimate)."""
        if self.enabled:
            self._hand_over()

    def _hand_over(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


class RefusalLog:
    """Whether to log a refusal: at most one line per identity per ``interval_s``, with the
    count of refusals left unlogged since."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str | None], tuple[float, int]] = {}

    def due(self, reason: str, identity: str | None, now: float) -> int | None:
        """None when a line about ``identity`` was logged less than ``interval_s`` ago (this
        refusal is counted); else the refusals not logged since the last line."""
        key = (reason, identity)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) >= _BUCKETS_KEPT:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval_s}
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]


class Admission:
    """The rate limiter, then the overload guard, for each new transaction; refusals are
    ``ResourceExhausted`` with a retry-after hint, counted (``refused``, by reason
    ``rate_limit`` or ``overload``) and logged at most once per identity per second."""

    def __init__(
        self,
        limits: RateLimits,
        *,
        max_in_flight: int,
        queue_ms: int,
        clock: AdmissionClock,
        refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.limits = limits
        self.rates = RateLimiter(limits)
        self.guard = OverloadGuard(max_in_flight, queue_ms, clock)
        self._clock = clock
        self._refused = refused
        self._refusal_log = RefusalLog()

    @property
    def enabled(self) -> bool:
        """Whether any check is on (a rate limit, or the overload guard)."""
        return self.limits.active or self.guard.enabled

    @property
    def in_flight(self) -> int:
        """Admitted transactions not yet decided (counted only with the overload guard on)."""
        return self.guard.in_flight

    @property
    def queued(self) -> int:
        return self.guard.queued

    async def admit(self, identity: str | None) -> float:
        """Admits a new transaction of ``identity``; the time to give ``release`` once it is
        decided.

        Raises:
            ResourceExhausted: over the identity's rate limit, or shed (nothing begun).
        """
        now = self._clock.monotonic()
        if self.limits.active:
            wait = self.rates.take(identity, now)
            if wait > 0:
                raise self._refuse("rate_limit", identity, wait, self._rate_message(identity))
        try:
            return await self.guard.admit()
        except Shed as shed:
            self.rates.give_back(identity, self._clock.monotonic())
            message = (
                f"coordinator overloaded, shedding new transactions: {shed.in_flight} begun and "
                f"undecided, {shed.queued} waiting (admission_max_in_flight = "
                f"{self.guard.max_in_flight}, admission_queue_ms = "
                f"{round(self.guard.queue_s * 1000)})"
            )
            raise self._refuse("overload", identity, shed.retry_after_s, message) from None

    def release(self, admitted_at: float) -> None:
        """Frees the slot of a transaction admitted at ``admitted_at``, now decided."""
        self.guard.release(admitted_at)

    def cancel(self, identity: str | None, admitted_at: float) -> None:
        """Undoes the admission of a transaction that was not begun after all (another check
        refused it): its slot, and its identity's token, are given back."""
        self.rates.give_back(identity, self._clock.monotonic())
        self.guard.cancel(admitted_at)

    def _rate_message(self, identity: str | None) -> str:
        name = identity_name(identity)
        rate = self.limits.rate_of(identity)
        setting = (
            f"its entry in rate_limits = {rate:g}"
            if name in self.limits.overrides
            else f"rate_limit_per_s = {rate:g}"
        )
        burst = self.limits.burst_of(rate)
        return (
            f"rate limit of identity {name!r}: over {rate:g} new transactions per second "
            f"({setting}, burst {burst:g})"
        )

    def _refuse(
        self, reason: str, identity: str | None, retry_after_s: float, message: str
    ) -> ResourceExhausted:
        self._refused(reason)
        retry_ms = max(1, math.ceil(retry_after_s * 1000))
        unlogged = self._refusal_log.due(reason, identity, self._clock.monotonic())
        if unlogged is not None:
            log.warning(
                "transaction_refused",
                reason=reason,
                caller=identity_name(identity),
                retry_after_ms=retry_ms,
                refused_since_last_line=unlogged,
            )
        return ResourceExhausted(
            f"{message}; retry after {retry_ms} ms (nothing was begun)",
            retry_after_s=retry_ms / 1000,
        )
