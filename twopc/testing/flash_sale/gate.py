"""The Redis stock gate: an atomic take-one-if-any in front of the database.

The gate is a counter in Redis, a cache of the stock row: ``take`` decrements it in one Lua
script only while it is positive, so at most as many buyers are admitted as units the gate
believes are left. The database stays the truth (its transaction still checks the stock), so the
gate may over-admit but never causes an oversell. A buyer whose transaction does not commit
gives the unit back, unless the database said sold out: then the counter is set to 0. When the
counter is missing (Redis restarted empty), the next ``take`` seeds
it from the database's stock row (``SET NX``: one seed wins) and tries again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import redis

__all__ = ["GateDown", "StockGate"]

# 1 admitted, 0 sold out, -1 no counter (seed it first).
_TAKE = """
local left = redis.call('GET', KEYS[1])
if not left then return -1 end
if tonumber(left) <= 0 then return 0 end
redis.call('DECR', KEYS[1])
return 1
"""
# A unit given back only to a counter that exists: a counter seeded after the take already
# counts the unit (the database never lost it).
_GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCR', KEYS[1]) end
return -1
"""


class GateDown(Exception):
    """Redis did not answer: the buyer is told to try again."""


class StockGate:
    def __init__(self, url: str, key: str, stock_in_database: Callable[[], int]) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._key = key
        self._stock_in_database = stock_in_database
        self._take: Any = self._redis.register_script(_TAKE)
        self._give_back: Any = self._redis.register_script(_GIVE_BACK)
        self.seeds = 0

    def take(self) -> bool:
        """True: admitted (one unit held for this buyer); False: sold out.

        Raises:
            GateDown: Redis is unreachable.
        """
        try:
            for _ in range(3):
                answer = int(self._take(keys=[self._key]))
                if answer >= 0:
                    return answer == 1
                if self._redis.set(self._key, self._stock_in_database(), nx=True):
                    self.seeds += 1
            raise GateDown("the gate's counter vanished while it was being seeded")
        except redis.RedisError as err:
            raise GateDown(f"Redis: {err}") from err

    def give_back(self) -> None:
        # A restarted gate is re-seeded from the database, which has the unit.
        with contextlib.suppress(redis.RedisError):
            self._give_back(keys=[self._key])

    def sold_out(self) -> None:
        """The database said sold out: the gate, which admitted the buyer, believed otherwise
        (seeded while units were held by transactions that then committed). It learns the
        truth: nobody else is admitted."""
        with contextlib.suppress(redis.RedisError):
            self._redis.set(self._key, 0, xx=True)

    def clear(self) -> None:
        self._redis.delete(self._key)

    def close(self) -> None:
        self._redis.close()
