"""``twopc bench-recovery``: how long a restarted coordinator takes to resolve N in-doubt
transactions.

On a playground without proxies, N one-shot transactions writing one row in every region are
started at once with two failpoints armed on the coordinator: ``coordinator.before_commit_record``
pauses about half of them with every branch prepared and no decision (presumed abort: they must be
rolled back), ``coordinator.after_commit_record`` pauses the rest with the COMMIT record durable
and phase 2 not begun (they must be committed). Once every agent reports N prepared branches the
coordinator is SIGKILLed and started again without failpoints. The figure is the time from that
start until no server lists a prepared branch of ours. Then every transaction's outcome is looked
up by its request id and checked against the rows: committed ones have a row in every region,
rolled-back ones in none, and the committed ones are exactly those with a COMMIT record.

The agents get pools large enough to hold every branch (prepared branches stay on their
sessions), and the servers connections enough for them (``SET GLOBAL max_connections``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from coordinator.decision_log._format import RecordType, check_header, scan
from coordinator.decision_log.file_log import LOG_NAME
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import AsyncClient, Outcome, RetryPolicy, TwopcError
from twopc.logs import configure_logging
from twopc.testing.playground.cluster import STATE_FILE, Cluster, wait_until
from twopc.testing.playground.invariants import prepared_branches
from twopc.testing.playground.tls import COORDINATOR

TARGET_S = 5.0
WAVE = 50  # transactions started together
TABLE = "recovery_bench"
SCHEMA = f"CREATE TABLE IF NOT EXISTS {TABLE} (k VARCHAR(64) PRIMARY KEY)"
FIRST_LIFE_ENV = {
    "TWOPC_FAILPOINTS": "coordinator.before_commit_record=50%pause;"
    "coordinator.after_commit_record=pause",
    "TWOPC_COORDINATOR_RECOVERY_INTERVAL_S": "3600",
}


@dataclass
class RecoveryFigures:
    in_doubt: int
    decided_commit: int
    regions: list[str]
    prepare_s: float  # from the first Begin until every branch was prepared
    coordinator_serving_s: float  # from the restart until the coordinator answered
    resolved_s: float  # from the restart until no server listed a prepared branch of ours
    committed: int
    rolled_back: int
    mismatches: list[str]

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.committed == self.decided_commit

    def summary(self) -> str:
        verdict = "met" if self.resolved_s <= TARGET_S else "MISSED"
        return "\n".join(
            [
                f"in-doubt transactions: {self.in_doubt} across {', '.join(self.regions)} "
                f"({self.decided_commit} with a COMMIT record, "
                f"{self.in_doubt - self.decided_commit} without)",
                f"  all branches prepared after {self.prepare_s:.2f} s",
                f"  coordinator answering {self.coordinator_serving_s:.2f} s after its restart",
                f"  every branch resolved {self.resolved_s:.2f} s after the restart "
                f"(target {TARGET_S:.0f} s: {verdict})",
                f"  outcomes: {self.committed} committed, {self.rolled_back} rolled back; "
                f"{len(self.mismatches)} mismatches with the rows or the log",
            ]
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-doubt", type=int, default=1000, help="transactions left in doubt")
    parser.add_argument("--regions", default="eu,us", help="regions each transaction writes in")
    parser.add_argument("--dir", type=Path, default=Path(".twopc-bench-recovery"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="report directory")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when an outcome disagrees with the rows or the log, or a branch is left."""
    configure_logging("warning", console=True)
    if args.in_doubt < 1:
        print("twopc bench-recovery: --in-doubt must be at least 1", file=sys.stderr)
        return 2
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    directory: Path = args.dir.resolve()
    if (directory / STATE_FILE).exists():
        Cluster.load(directory).down()
    shutil.rmtree(directory, ignore_errors=True)
    cluster = _create_cluster(directory, regions, args.in_doubt)
    say(f"starting a playground in {directory} ({', '.join(regions)})")
    cluster.up()
    try:
        figures = measure(cluster, args.in_doubt)
    finally:
        if args.keep:
            say(f"cluster left running: twopc playground --dir {directory} --down")
        else:
            cluster.down()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench-recovery.json"
    path.write_text(json.dumps({**asdict(figures), "target_s": TARGET_S}, indent=2) + "\n")
    say(figures.summary())
    for line in figures.mismatches[:20]:
        say(f"  mismatch: {line}")
    say(f"report: {path}")
    return 0 if figures.ok else 1


def _create_cluster(directory: Path, regions: Sequence[str], in_doubt: int) -> Cluster:
    sessions = in_doubt + 64
    cluster = Cluster.create(
        directory,
        regions,
        agent_settings={"pool_size": sessions, "pool_overflow": 0, "max_branches": sessions},
        coordinator_settings={"max_timeout_ms": 300_000},
    )
    # Until the kill: the paused transactions held, and no periodic recovery pass finishing the
    # decided ones early (it would be right to: their COMMIT records are durable).
    cluster.component("coordinator").env.update(FIRST_LIFE_ENV)
    cluster.save()
    return cluster


def measure(cluster: Cluster, in_doubt: int) -> RecoveryFigures:
    for region in cluster.regions:
        with cluster.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute(f"SET GLOBAL max_connections = {in_doubt + 200}")
            cursor.execute(SCHEMA)
            cursor.execute(f"DELETE FROM {TABLE}")
    request_ids = [f"rb-{i}" for i in range(in_doubt)]
    began = time.monotonic()
    say(f"starting {in_doubt} transactions; the coordinator pauses each before phase 2")
    loop = asyncio.new_event_loop()
    try:
        client, tasks = loop.run_until_complete(_start_in_waves(cluster, request_ids))
        prepare_s = time.monotonic() - began
        say(f"{in_doubt} transactions in doubt after {prepare_s:.2f} s; SIGKILL the coordinator")
        cluster.kill("coordinator", signal.SIGKILL)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(client.close())
    finally:
        loop.close()
    decided = _commit_records(cluster)
    coordinator = cluster.component("coordinator")
    for name in FIRST_LIFE_ENV:
        coordinator.env.pop(name, None)
    cluster.save()
    restarted = time.monotonic()
    cluster.restart("coordinator", wait=False)
    cluster.wait_ready("coordinator", timeout=60)
    serving_s = time.monotonic() - restarted
    wait_until(
        lambda: not any(prepared_branches(cluster).values()), 120, "every branch resolved", 0.01
    )
    resolved_s = time.monotonic() - restarted
    committed, rolled_back, mismatches = _check(cluster, request_ids, decided)
    return RecoveryFigures(
        in_doubt=in_doubt,
        decided_commit=len(decided),
        regions=list(cluster.regions),
        prepare_s=round(prepare_s, 3),
        coordinator_serving_s=round(serving_s, 3),
        resolved_s=round(resolved_s, 3),
        committed=committed,
        rolled_back=rolled_back,
        mismatches=mismatches,
    )


async def _start_in_waves(
    cluster: Cluster, request_ids: Sequence[str]
) -> tuple[AsyncClient, list[asyncio.Task[None]]]:
    """Sends every transaction, a wave at a time: the next wave goes once every branch of the
    earlier ones is prepared (and its transaction paused). A thousand transactions at once would
    measure an overloaded agent's thread pool, not recovery. None is answered before the kill."""
    client = cluster.async_client(retry_policy=RetryPolicy(attempts=1), rpc_timeout=300.0)

    async def one(rid: str) -> None:
        work = {r: [(f"INSERT INTO {TABLE} (k) VALUES (%s)", [rid])] for r in cluster.regions}
        # The coordinator is killed under it: the lookup after recovery tells the outcome.
        with contextlib.suppress(TwopcError):
            await client.run(work, timeout=240.0, request_id=rid)

    tasks: list[asyncio.Task[None]] = []
    for start in range(0, len(request_ids), WAVE):
        tasks.extend(asyncio.create_task(one(rid)) for rid in request_ids[start : start + WAVE])
        await asyncio.wait_for(_all_prepared(cluster, len(tasks)), timeout=60)
    return client, tasks


async def _all_prepared(cluster: Cluster, count: int) -> None:
    channels = {  # GetInfo, as the coordinator: the agents obey no one else
        r: cluster.aio_channel(f"agent-{r}", identity=COORDINATOR) for r in cluster.regions
    }
    try:
        while True:
            infos = [
                await pb_grpc.ParticipantStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
                for channel in channels.values()
            ]
            if all(info.prepared_branches >= count for info in infos):
                return
            await asyncio.sleep(0.05)
    finally:
        for channel in channels.values():
            await channel.close(None)


def _commit_records(cluster: Cluster) -> set[str]:
    """Txids with a COMMIT record in the dead coordinator's log (read, not repaired)."""
    data = (Path(cluster.component("coordinator").data_dir) / LOG_NAME).read_bytes()
    if problem := check_header(data):
        raise RuntimeError(f"the decision log is not readable: {problem}")
    return {strings[0] for kind, strings in scan(data).records if kind is RecordType.COMMIT}


def _check(
    cluster: Cluster, request_ids: Sequence[str], decided: set[str]
) -> tuple[int, int, list[str]]:
    rows: dict[str, set[str]] = {}
    for region in cluster.regions:
        with cluster.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute(f"SELECT k FROM {TABLE}")
            rows[region] = {str(k) for (k,) in cursor.fetchall()}
    committed = rolled_back = 0
    mismatches: list[str] = []
    with cluster.client() as client:
        for rid in request_ids:
            info = client.get_transaction(request_id=rid)
            applied = [r for r in cluster.regions if rid in rows[r]]
            if info.outcome is Outcome.COMMITTED:
                committed += 1
                if len(applied) != len(cluster.regions) or info.txid not in decided:
                    mismatches.append(f"{rid} ({info.txid}) committed, rows in {applied}")
            elif info.outcome is Outcome.ABORTED:
                rolled_back += 1
                if applied or info.txid in decided:
                    mismatches.append(f"{rid} ({info.txid}) aborted, rows in {applied}")
            else:
                mismatches.append(f"{rid} ({info.txid}) is {info.outcome.value} after recovery")
    return committed, rolled_back, mismatches


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twopc bench-recovery", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
