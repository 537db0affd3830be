"""``twopc bench-takeover``: from a group member's SIGKILL to its in-doubt branches resolved.

A playground group (``--members``, 3 by default, on a 3-node Galera store, the default lease of
3 s and takeover look every 0.5 s). Each round restarts member 2 with a failpoint that kills it
(SIGKILL of itself) in the middle of a transfer it coordinates, at one of two moments in turn:

- ``after_commit_record``: the COMMIT decision is durable in the store, both branches prepared;
  a peer must commit them;
- ``before_commit_record``: both branches prepared, nothing decided; a peer must roll them back.

The clock starts when the member's process is gone and stops when no region's database lists a
prepared branch any more (XA RECOVER, polled every 10 ms); the outcome is checked (committed
branches have their markers, rolled-back ones have none). Member 2 is then started again, takes
its id back, and the next round begins. Prints each round and the median and worst time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from twopc.client import Client, RetryPolicy, TwopcError
from twopc.logs import configure_logging
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.invariants import committed_markers, prepared_branches

__all__ = ["add_arguments", "main", "run"]

MOMENTS = ("after_commit_record", "before_commit_record")
_VICTIM = "coordinator-2"


@dataclass(frozen=True)
class Round:
    number: int
    moment: str
    txid: str
    seconds: float
    outcome: str  # committed | rolled back
    correct: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6, help="kills (default 6)")
    parser.add_argument("--members", type=int, default=3, help="the group's size (default 3)")
    parser.add_argument("--lease-ms", type=int, default=3000, help="lease_ms (default 3000)")
    parser.add_argument("--regions", default="eu,us")
    parser.add_argument("--dir", type=Path, default=Path(".twopc-bench-takeover"))
    parser.add_argument("--out", type=Path, default=None, help="a directory for the JSON report")


def run(args: argparse.Namespace) -> int:
    configure_logging("warning", console=True)
    logging.getLogger("twopc.client").setLevel(logging.CRITICAL)  # the kills' lost answers
    if args.members < 2:
        print("twopc bench-takeover: a takeover needs at least 2 members", file=sys.stderr)
        return 2
    directory: Path = args.dir.resolve()
    shutil.rmtree(directory, ignore_errors=True)
    regions = [r.strip() for r in args.regions.split(",") if r.strip()][:2]
    cluster = Cluster.create(
        directory,
        regions,
        metrics=False,
        coordinators=args.members,
        log_store="galera",
        coordinator_settings={"lease_ms": args.lease_ms},
    )
    say(f"starting a group of {args.members} on a 3-node Galera store in {directory}")
    cluster.up()
    rounds: list[Round] = []
    try:
        create_accounts(cluster, 10)
        for number in range(1, args.rounds + 1):
            rounds.append(_round(cluster, number, MOMENTS[(number - 1) % len(MOMENTS)]))
            say(_line(rounds[-1]))
    finally:
        cluster.down()
        cluster.remove_store()
    summary = _summary(rounds, args.lease_ms)
    say(summary)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        data = {"lease_ms": args.lease_ms, "rounds": [asdict(r) for r in rounds]}
        (args.out / "bench-takeover.json").write_text(json.dumps(data, indent=2) + "\n")
        (args.out / "bench-takeover.md").write_text(summary + "\n")
    return 0 if rounds and all(r.correct for r in rounds) else 1


def _round(cluster: Cluster, number: int, moment: str) -> Round:
    victim = cluster.component(_VICTIM)
    victim.env["TWOPC_FAILPOINTS"] = f"coordinator.{moment}=crash"
    cluster.restart(_VICTIM)
    request_id = f"takeover-{number}-{int(time.time())}"
    policy = RetryPolicy(attempts=1, deadline=1.0)
    tls = cluster.client_tls()
    # The member dies under the call: its outcome is what this round measures.
    with (
        Client(victim.address, tls=tls, insecure=tls is None, retry_policy=policy) as client,
        contextlib.suppress(TwopcError),
    ):
        client.run(
            {
                region: [("UPDATE accounts SET balance = balance + %s WHERE id = 1", [sign])]
                for region, sign in zip(cluster.regions, (-1, 1), strict=False)
            },
            timeout=10,
            request_id=request_id,
        )
    wait_until(lambda: not victim.alive(), 20, f"{_VICTIM} dying at its failpoint")
    killed = time.monotonic()
    txid = next(
        (t for txids in prepared_branches(cluster).values() for t in txids if request_id in t), ""
    )
    wait_until(lambda: not any(prepared_branches(cluster).values()), 60, "the takeover", 0.01)
    seconds = time.monotonic() - killed
    markers = {r for r, txids in committed_markers(cluster, [txid]).items() if txid in txids}
    committed = markers == set(cluster.regions)
    expected = moment == "after_commit_record"
    victim.env.pop("TWOPC_FAILPOINTS", None)
    cluster.restart(_VICTIM)
    return Round(
        number,
        moment,
        txid,
        round(seconds, 3),
        "committed" if committed else "rolled back" if not markers else f"half: {markers}",
        bool(txid) and committed == expected and (committed or not markers),
    )


def _line(r: Round) -> str:
    ok = "ok" if r.correct else "WRONG"
    return f"  round {r.number}: killed {r.moment}: {r.outcome} after {r.seconds:.2f} s ({ok})"


def _summary(rounds: Sequence[Round], lease_ms: int) -> str:
    if not rounds:
        return "no round ran"
    times = [r.seconds for r in rounds]
    return (
        f"{len(rounds)} SIGKILLs of a member, lease {lease_ms} ms: in-doubt branches resolved "
        f"by a peer after {statistics.median(times):.2f} s (median), {max(times):.2f} s (worst); "
        f"{sum(r.correct for r in rounds)}/{len(rounds)} outcomes right"
    )


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twopc bench-takeover", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
