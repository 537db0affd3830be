"""``twopc playground``: start, stop, restart and signal a local cluster."""

from __future__ import annotations

import argparse
import signal
import sys

from twopc.testing.playground.cluster import STATE_FILE, Cluster
from twopc.testing.playground.mariadb import PlaygroundError


def playground(args: argparse.Namespace) -> int:
    try:
        return _playground(args)
    except (PlaygroundError, TimeoutError) as err:
        print(f"twopc playground: {err}", file=sys.stderr)
        return 1


def _playground(args: argparse.Namespace) -> int:
    if args.down:
        Cluster.load(args.dir).down()
        print(f"playground in {args.dir} stopped")
        return 0
    if args.restart:
        cluster = Cluster.load(args.dir)
        pid = cluster.restart(args.restart)
        print(f"{args.restart} restarted, pid {pid}")
        return 0
    if args.kill:
        cluster = Cluster.load(args.dir)
        sig = signal.Signals[f"SIG{args.signal.upper().removeprefix('SIG')}"]
        cluster.kill(args.kill, sig, wait=False)
        print(f"sent {sig.name} to {args.kill}")
        return 0
    if (args.dir / STATE_FILE).exists():
        existing = Cluster.load(args.dir)
        running = [n for n, c in existing.components.items() if c.alive()]
        if running:
            raise PlaygroundError(
                f"a playground runs in {args.dir} ({', '.join(running)}); "
                f"stop it first: twopc playground --dir {args.dir} --down"
            )
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    cluster = Cluster.create(args.dir, regions, proxied=args.proxied)
    cluster.up()
    print(f"twopc playground up; state file: {cluster.state_path}")
    for name, component in cluster.components.items():
        print(f"  {name:<14} {component.address:<22} pid {component.pid}")
    for link in cluster.links:
        print(f"  link {link.name:<24} {link.listen} -> {link.upstream}")
    print(f"SDK: Client({cluster.coordinator_address!r})")
    if args.detach:
        print(f"stop it with: twopc playground --dir {args.dir} --down")
        return 0
    print("Ctrl-C stops everything")
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        cluster = Cluster.load(args.dir)
        cluster.down()
        print("playground stopped")
    return 0
