"""Child process of test_decision_log_sigkill: records commit decisions until it is killed.

Usage: ``python decision_log_child.py DIRECTORY PREFIX CONCURRENCY LIMIT``. Tasks record COMMITs
``PREFIX.<n>`` for n < LIMIT and print each txid on stdout only after ``record_commit`` returned.
Every even n is then ended, and the log is kept small, so that compactions run while it is killed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path

from coordinator.decision_log import CommitRecord
from coordinator.decision_log.file_log import FileDecisionLog

MAX_BYTES = 4096


async def main(directory: Path, prefix: str, concurrency: int, limit: int) -> None:
    log = FileDecisionLog(directory, max_bytes=MAX_BYTES, end_flush_delay=0.001)
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
    directory, prefix, concurrency, limit = sys.argv[1:5]
    asyncio.run(main(Path(directory), prefix, int(concurrency), int(limit)))
