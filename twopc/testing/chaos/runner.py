"""``twopc chaos``: a bank workload on a proxied playground while faults are injected from a seed.

1. Start a playground with a fault proxy on every hop and failpoint admin enabled on the daemons.
2. Run transfers between accounts (most across two regions, some within one) from several
   client threads, recording what each client saw, while the injector applies the schedule.
3. Heal everything, wait until the cluster is quiescent (nothing prepared, nothing active), look
   up every outcome the clients did not see, and check I1-I3 and I5-I7 on the databases.
4. Write the JSON report, the PNG timeline and a summary; exit 1 if an invariant broke.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import Client, RetryPolicy
from twopc.logs import configure_logging
from twopc.testing.chaos.injector import Injector, faketime_library
from twopc.testing.chaos.outbox_check import OutboxWorkload, QueueWatcher, outbox_verdicts
from twopc.testing.chaos.outbox_check import resolve as resolve_publications
from twopc.testing.chaos.report import ChaosResult, plot_timeline, write_json
from twopc.testing.chaos.schedule import FaultKind, Targets, plan
from twopc.testing.playground.bank import Transfer, TransferWorkload, create_accounts, total_balance
from twopc.testing.playground.cluster import (
    RABBITMQ,
    RELAY,
    STATE_FILE,
    STORE_NODE,
    Cluster,
    wait_until,
)
from twopc.testing.playground.invariants import (
    Verdict,
    agents_liveness,
    check_bank,
    prepared_branches,
    resolve_unknown,
)
from twopc.testing.playground.tls import COORDINATOR

QUIESCENCE_DEADLINE_S = 120.0
TRANSFER_TIMEOUT_S = 5.0
LATE_SCHEDULE_GRACE_S = 60.0  # how far past --duration a late schedule may still run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path(".twopc-chaos"))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--regions", default="eu,us,ap")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--accounts", type=int, default=50, help="accounts per region")
    parser.add_argument(
        "--faults",
        default=",".join(k.value for k in FaultKind),
        help="fault kinds to draw from (default: all)",
    )
    parser.add_argument("--mean-gap", type=float, default=4.0, help="mean seconds between faults")
    parser.add_argument("--max-concurrent", type=int, default=2, help="faults at once, at most")
    parser.add_argument("--report", type=Path, default=None, help="JSON report (default: in --dir)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG timeline (default: in --dir)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    parser.add_argument(
        "--no-outbox",
        action="store_true",
        help="no outbox: by default some transactions publish through the outbox in the first "
        "region, a RabbitMQ node and the relay run (and are killed, stopped and cut off), and "
        "I8 and I9 are checked on the queue",
    )
    parser.add_argument(
        "--coordinators",
        type=int,
        default=1,
        help="coordinators: above 1, a group on a 3-node Galera store, and the group's faults "
        "(members and store nodes killed and stopped, a member cut off from the store or from "
        "an agent) join the draw (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    configure_logging("warning", console=True)  # the progress line and the report say the rest
    logging.getLogger("twopc.client").setLevel(logging.ERROR)  # retries are counted, not logged
    kinds = [FaultKind(k.strip()) for k in args.faults.split(",") if k.strip()]
    if FaultKind.SLOW_CLOCK in kinds and args.coordinators > 1 and faketime_library() is None:
        say(
            "warning: no slowed member clocks: libfaketime is missing (deploy/setup.sh installs it)"
        )
        kinds.remove(FaultKind.SLOW_CLOCK)
    directory: Path = args.dir.resolve()
    if (directory / STATE_FILE).exists():
        previous = Cluster.load(directory)
        previous.down()
        previous.remove_store()
        shutil.rmtree(directory)
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    cluster = Cluster.create(
        directory,
        regions,
        proxied=True,
        coordinator_settings={
            "admin_failpoints": True,
            "recovery_interval_s": 1.0,
            "rpc_timeout_s": 3.0,
        },
        agent_settings={"admin_failpoints": True, "lock_wait_timeout_s": 5},
        coordinators=args.coordinators,
        log_store="galera" if args.coordinators > 1 else "file",
        outbox=not args.no_outbox,
    )
    transport = "mutual TLS" if cluster.tls is not None else "PLAINTEXT"
    group = f"; a group of {args.coordinators} on Galera" if args.coordinators > 1 else ""
    say(f"starting a proxied playground in {directory} ({', '.join(regions)}; {transport}{group})")
    cluster.up()
    try:
        result = _run(cluster, args, kinds)
        result.extra["mutual_tls"] = cluster.tls is not None
    finally:
        if args.keep:
            say(f"cluster left running: twopc playground --dir {directory} --down")
        else:
            cluster.down()
            cluster.remove_store()
    report = args.report or directory / "chaos-report.json"
    timeline = args.plot or directory / "chaos-timeline.png"
    return finish(result, report, timeline)


def finish(result: ChaosResult, report: Path, timeline: Path) -> int:
    """Writes the report and the timeline and prints the summary; returns the exit status, which
    the invariants alone decide (1 if one broke). Without matplotlib the timeline is skipped,
    with a warning."""
    write_json(result, report)
    drawn = plot_timeline(result, timeline)
    say(result.summary())
    say(f"report: {report}")
    if drawn:
        say(f"timeline: {timeline}")
    else:
        say(
            "warning: no timeline drawn: matplotlib is not installed "
            "(pip install 'twopc[chaos]' adds it)"
        )
    return 0 if result.ok else 1


def _run(cluster: Cluster, args: argparse.Namespace, kinds: list[FaultKind]) -> ChaosResult:
    expected_total = create_accounts(cluster, args.accounts)
    processes = _processes(cluster)
    # A member's links to the other store nodes are faulted with its link to its own node.
    links = [k.name for k in cluster.links if not re.search(r"-store-\d+$", k.name)]
    targets = Targets(tuple(processes), tuple(links))
    schedule = plan(
        args.seed,
        args.duration,
        targets,
        kinds=kinds,
        mean_gap=args.mean_gap,
        max_concurrent=args.max_concurrent,
    )
    say(f"{len(schedule)} faults planned from seed {args.seed} over {args.duration:.0f} s")
    injector = Injector(cluster)
    policy = RetryPolicy(attempts=4, initial_backoff=0.05, max_backoff=0.5, deadline=3.0)
    with cluster.client(retry_policy=policy, rpc_timeout=5.0) as client:
        workload = TransferWorkload(
            client,
            coordinator_id=cluster.coordinator_id,
            regions=cluster.regions,
            accounts=args.accounts,
            seed=args.seed,
            run_id=f"chaos{args.seed}-{int(time.time())}",
            local_share=0.2,
        )
        counts: Counter[str] = Counter()
        stop = threading.Event()
        outbox = (
            OutboxWorkload(client, cluster.regions, args.accounts, args.seed, workload.run_id)
            if RELAY in cluster.components
            else None
        )
        watcher = QueueWatcher(cluster) if outbox is not None else None
        threads = [
            *_outbox_threads(outbox, watcher, stop),
            threading.Thread(target=injector.run, args=(schedule, stop), name="injector"),
            threading.Thread(target=injector.supervise, args=(stop,), name="supervisor"),
            threading.Thread(
                target=workload.run,
                args=(10**9, args.workers),
                kwargs={"stop": stop, "on_done": lambda t: counts.update([t.outcome])},
                name="workload",
            ),
        ]
        for thread in threads:
            thread.start()
        try:
            _show_progress(injector, counts, args.duration, stop)
        except BaseException:
            # Interrupted (Ctrl-C): the injector must stop before the cluster goes down, or a
            # component it restarts afterwards outlives the run, and the next run in the same
            # directory meets it.
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            raise
        if not injector.done.is_set():
            say(f"the schedule ran {LATE_SCHEDULE_GRACE_S:.0f} s late: its last faults dropped")
        for thread in threads:
            thread.join(timeout=60)
        say("healing everything")
        injector.heal_all()
        healed = time.monotonic()
        try:
            wait_until(lambda: _quiescent(cluster), QUIESCENCE_DEADLINE_S, "quiescence", 0.1)
        except TimeoutError:
            say(f"not quiescent {QUIESCENCE_DEADLINE_S:.0f} s after the heal: I5 is broken")
        quiescence = time.monotonic() - healed
        transfers: list[Transfer] = list(workload.transfers)
        resolved = resolve_unknown(client, transfers)
        verdicts = check_bank(
            cluster,
            transfers,
            expected_total=expected_total,
            actual_total=total_balance(cluster),
            resolved=resolved,
        )
        verdicts.append(
            agents_liveness(_held_by_agents(cluster), quiescence, QUIESCENCE_DEADLINE_S)
        )
        outbox_checks, outbox_counts = _check_outbox(cluster, client, outbox, watcher)
        verdicts += outbox_checks
    result = ChaosResult(
        seed=args.seed,
        duration=args.duration,
        regions=cluster.regions,
        transfers=transfers,
        faults=injector.applied,
        planned=len(schedule),
        resolved=resolved,
        verdicts=verdicts,
        quiescence_s=quiescence,
        began_at=injector.began,
    )
    result.extra["restarted_by_supervisor"] = len(injector.supervised)
    if outbox_counts:
        result.extra["outbox"] = outbox_counts
    return result


def _processes(cluster: Cluster) -> list[str]:
    """Every process a fault may hit."""
    processes = list(cluster.members)
    processes += [f"agent-{r}" for r in cluster.regions]
    processes += [f"mariadb-{r}" for r in cluster.regions]
    if cluster.store is not None:
        processes += [f"{STORE_NODE}{node}" for node in range(1, cluster.store.size + 1)]
    return processes + [name for name in (RELAY, RABBITMQ) if name in cluster.components]


def _check_outbox(
    cluster: Cluster,
    client: Client,
    outbox: OutboxWorkload | None,
    watcher: QueueWatcher | None,
) -> tuple[list[Verdict], dict[str, object]]:
    """I8 and I9 once the run is healed (nothing without an outbox)."""
    if outbox is None or watcher is None:
        return [], {}
    resolve_publications(client, outbox.publications)
    try:
        return outbox_verdicts(cluster, watcher, outbox.publications)
    finally:
        watcher.stop()


def _outbox_threads(
    outbox: OutboxWorkload | None, watcher: QueueWatcher | None, stop: threading.Event
) -> list[threading.Thread]:
    if outbox is None or watcher is None:
        return []
    watcher.start()  # before the first message can be published
    return [threading.Thread(target=outbox.run, args=(stop,), name="outbox-workload")]


def _show_progress(
    injector: Injector, counts: Counter[str], duration: float, stop: threading.Event
) -> None:
    while not stop.wait(1.0):
        elapsed = injector.now()
        active = [
            f.event.describe() for f in injector.applied if f.started <= elapsed and not f.ended
        ]
        sys.stdout.write(
            f"\r{elapsed:6.1f}s  committed {counts['committed']:>6}  aborted {counts['aborted']:>5}"
            f"  unknown {counts['unknown']:>4}  faults: {'; '.join(active)[:60]:<60}"
        )
        sys.stdout.flush()
        # Restarts run in the injector's thread; on a slow machine they push later faults past
        # the planned end, and the workload keeps running until the schedule is through.
        if elapsed >= duration and (
            injector.done.is_set() or elapsed >= duration + LATE_SCHEDULE_GRACE_S
        ):
            stop.set()
    sys.stdout.write("\n")


def _quiescent(cluster: Cluster) -> bool:
    """Nothing prepared on any server, and no branch held by any agent."""
    return not any(prepared_branches(cluster).values()) and not _held_by_agents(cluster)


def _held_by_agents(cluster: Cluster) -> list[str]:
    """Agents that hold a branch (active or prepared), or that do not answer."""
    held = []
    for region in cluster.regions:
        # GetInfo, as the coordinator: the agents obey no one else.
        with cluster.channel(f"agent-{region}", identity=COORDINATOR) as channel:
            try:
                info = pb_grpc.ParticipantStub(channel).GetInfo(pb.GetInfoRequest(), timeout=2)
            except grpc.RpcError:
                held.append(f"agent-{region}: not answering")
                continue
        if info.active_branches or info.prepared_branches:
            held.append(
                f"agent-{region}: {info.active_branches} active, {info.prepared_branches} prepared"
            )
    return held


def say(text: str) -> None:
    print(text, flush=True)
