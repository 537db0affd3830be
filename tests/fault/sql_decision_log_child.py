"""Child process of test_sql_decision_log_sigkill: records commit decisions in a SQL store until it
is killed.

Usage: ``python sql_decision_log_child.py URL PREFIX CONCURRENCY LIMIT``. Tasks record COMMITs
``PREFIX.<n>`` for n < LIMIT and print each txid on stdout only after ``record_commit`` returned.
Every even n is then ended (its row deleted), so that deletions are in flight when it is killed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

import structlog

from coordinator.decision_log import CommitRecord
from coordinator.decision_log.sql_log import SqlDecisionLog


async def main(url: str, prefix: str, concurrency: int, limit: int) -> None:
    # stdout carries the acknowledgements only: the log's own lines go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    log = SqlDecisionLog(url, coordinator_id="k", end_flush_delay=0.001)
    await log.open()
    numbers = iter(range(limit))

    async def worker() -> None:
        for n in numbers:
            txid = f"{prefix}.{n}"
            await log.record_commit(CommitRecord(txid, ("region-a", "region-b")))
            os.write(1, f"{txid}\n".encode())  # one line per write: atomic on a pipe
            if n % 2 == 0:
                await log.record_end(txid)

    await asyncio.gather(*(worker() for _ in itertools.repeat(None, concurrency)))
    await log.close()


if __name__ == "__main__":
    url, prefix, concurrency, limit = sys.argv[1:5]
    asyncio.run(main(url, prefix, int(concurrency), int(limit)))
