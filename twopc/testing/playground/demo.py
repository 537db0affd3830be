"""``twopc demo``: bank transfers across three regions, the coordinator SIGKILLed mid-run.

It starts a playground, runs transfers through the SDK with a live progress line, kills the
coordinator with SIGKILL a third of the way through, starts it again from the command line in the
state file, and when the transfers are done shows recovery resolving what was in doubt and checks
the invariants on the databases: no transfer half-applied, none lost, totals conserved.

On a terminal the progress line is redrawn in place; in a pipe or a log the demo prints plain
lines instead, in the order things happened. Afterwards the cluster is stopped and its directory
removed, unless ``--keep`` (both stay) or the demo failed (the directory stays, for its logs).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from twopc.client import RetryPolicy
from twopc.testing.playground.bank import (
    ABORTED,
    COMMITTED,
    UNKNOWN,
    TransferWorkload,
    create_accounts,
    total_balance,
)
from twopc.testing.playground.cluster import STATE_FILE, Cluster, wait_until
from twopc.testing.playground.invariants import check_bank, prepared_branches, resolve_unknown
from twopc.testing.playground.mariadb import PlaygroundError

REGIONS = ("eu", "us", "ap")
PLAIN_PROGRESS_EVERY_S = 2.0  # a progress line this often when stdout is not a terminal


def run_demo(args: argparse.Namespace) -> int:
    try:
        return _demo(args)
    except (PlaygroundError, TimeoutError) as err:
        print(f"twopc demo: {err}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if (directory / STATE_FILE).exists():
        Cluster.load(directory).down()
        shutil.rmtree(directory)
    say(f"starting a playground in {directory}: 3 MariaDB servers, 3 agents, 1 coordinator")
    cluster = Cluster.create(directory, REGIONS)
    status = 1
    try:
        started = time.monotonic()
        cluster.up()
        say(f"  up in {time.monotonic() - started:.1f} s; state file {cluster.state_path}")
        for name, component in cluster.components.items():
            say(f"  {name:<14} {component.address:<22} pid {component.pid}")
        status = _run(cluster, args)
        return status
    finally:
        if args.keep:
            say(f"cluster left running; stop it with: twopc playground --dir {directory} --down")
        else:
            cluster.down()
            if status == 0:
                shutil.rmtree(directory)
            else:
                say(f"the cluster's directory is kept for its logs: {directory.resolve()}")


class Progress:
    """Counts outcomes as transfers finish, and notes what the chaos did when."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: Counter[str] = Counter()
        self.events: list[str] = []
        self.changed = threading.Condition()
        self.clock = clock
        self.began = clock()

    def done(self, outcome: str) -> None:
        with self.changed:
            self.counts[outcome] += 1
            self.changed.notify_all()

    def note(self, event: str) -> None:
        with self.changed:
            self.events.append(f"{self.clock() - self.began:5.1f}s  {event}")

    def line(self, planned: int) -> str:
        elapsed = self.clock() - self.began
        total = sum(self.counts.values())
        return (
            f"{elapsed:6.1f}s  transfers {total:>5}/{planned}  "
            f"committed {self.counts[COMMITTED]:>5}  aborted {self.counts[ABORTED]:>4}  "
            f"unknown {self.counts[UNKNOWN]:>3}  {total / max(elapsed, 1e-9):6.0f} tps"
        )


def _crash_coordinator_after(cluster: Cluster, progress: Progress, transfers: int) -> None:
    with progress.changed:
        progress.changed.wait_for(lambda: sum(progress.counts.values()) >= transfers)
    cluster.kill("coordinator", signal.SIGKILL)
    progress.note("coordinator SIGKILLed")
    restarting = time.monotonic()
    cluster.restart("coordinator")
    progress.note(
        "coordinator restarted from its recorded command line "
        f"({time.monotonic() - restarting:.1f} s until it answered)"
    )


def show_progress(
    runner: threading.Thread,
    progress: Progress,
    planned: int,
    out: TextIO,
    *,
    live: bool,
    every: float = PLAIN_PROGRESS_EVERY_S,
) -> None:
    """Shows the transfers' progress until ``runner`` ends.

    ``live`` (a terminal): one line redrawn in place four times a second, each event printed
    under it as it comes. Otherwise (a pipe, a log): plain lines only, in the order things
    happened: each event as it comes, a progress line every ``every`` seconds, and the last one
    when the transfers are done."""
    shown = 0
    last_line = -every
    while True:
        running = runner.is_alive()
        with progress.changed:  # every event taken here happened before this line's moment
            events = progress.events[shown:]
            line = progress.line(planned)
            now = progress.clock()
        shown += len(events)
        if live:
            out.write("\r" + line)
            for event in events:
                out.write(f"\n  ! {event}")
            if events:
                out.write("\n")  # the next line is drawn below the events
        else:
            for event in events:
                out.write(f"  ! {event}\n")
            if not running or now - last_line >= every:
                last_line = now
                out.write(line + "\n")
        out.flush()
        if not running:
            break
        runner.join(0.25)
    if live and not events:
        out.write("\n")


def _run(cluster: Cluster, args: argparse.Namespace) -> int:
    expected_total = create_accounts(cluster, args.accounts)
    say(f"{args.accounts} accounts per region, total balance {expected_total}")
    progress = Progress()
    policy = RetryPolicy(attempts=60, deadline=30.0)
    with cluster.client(retry_policy=policy) as client:
        workload = TransferWorkload(
            client,
            coordinator_id=cluster.coordinator_id,
            regions=cluster.regions,
            accounts=args.accounts,
            seed=args.seed,
            run_id=f"demo{int(time.time())}",
        )
        runner = threading.Thread(
            target=workload.run,
            args=(args.transfers, args.workers),
            kwargs={"on_done": lambda transfer: progress.done(transfer.outcome)},
        )
        chaos = threading.Thread(
            target=_crash_coordinator_after,
            args=(cluster, progress, max(1, args.transfers // 3)),
            daemon=True,
        )
        runner.start()
        chaos.start()
        show_progress(runner, progress, args.transfers, sys.stdout, live=sys.stdout.isatty())
        chaos.join(timeout=60)

        say("waiting for recovery to resolve every prepared branch ...")
        quiet_start = time.monotonic()
        wait_until(lambda: not any(prepared_branches(cluster).values()), 30.0, "quiescence", 0.1)
        say(f"  no prepared branch left on any server after {time.monotonic() - quiet_start:.2f} s")
        resolved = resolve_unknown(client, workload.transfers)
        verdicts = check_bank(
            cluster,
            workload.transfers,
            expected_total=expected_total,
            actual_total=total_balance(cluster),
            resolved=resolved,
        )
    counts = progress.counts
    say(
        f"{len(workload.transfers)} transfers: {counts[COMMITTED]} committed, "
        f"{counts[ABORTED]} aborted, {counts[UNKNOWN]} unknown to the client "
        f"(resolved by lookup: {dict(Counter(resolved.values()))})"
    )
    for verdict in verdicts:
        say(f"  {verdict}")
    ok = all(v.holds for v in verdicts)
    say(
        "all invariants hold"
        if ok
        else "INVARIANT BROKEN: see above and the logs in the cluster dir"
    )
    return 0 if ok else 1


def say(text: str) -> None:
    print(text, flush=True)
