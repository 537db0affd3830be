"""``twopc playground``: start, stop, restart and signal a local cluster."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from twopc.testing.playground.cluster import DATABASE, STATE_FILE, STORE_NODE, Cluster
from twopc.testing.playground.mariadb import PlaygroundError
from twopc.testing.playground.ports import (
    AGENT_PORT,
    COORDINATOR_PORT,
    DATABASE_PORT,
    LOOPBACK,
    is_free,
)
from twopc.testing.playground.tls import CLIENT
from twopc.tls import ENV_CA, ENV_CERT, ENV_KEY

COORDINATOR_ENV = "TWOPC_COORDINATOR"  # the README's example reads it

# The README's examples: every region's database gets these tables (left as they are when the
# playground starts again in the same directory; missing seed rows are put back).
EXAMPLE_TABLES = (
    "CREATE TABLE IF NOT EXISTS stock (sku VARCHAR(32) PRIMARY KEY, qty INT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "sku VARCHAR(32) NOT NULL, customer BIGINT NOT NULL, "
    "created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    "CREATE TABLE IF NOT EXISTS accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL)",
    "INSERT IGNORE INTO stock (sku, qty) VALUES ('A1', 100), ('B2', 50), ('C3', 0)",
    "INSERT IGNORE INTO accounts (id, balance) VALUES (1, 1000), (2, 1000), (3, 1000), "
    "(4, 1000), (5, 1000)",
)
EXAMPLE_TABLE_NAMES = ("stock", "orders", "accounts")


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
    if args.restart and args.restart.startswith(STORE_NODE):
        cluster = Cluster.load(args.dir)
        node = _store_node(cluster, args.restart)
        cluster.store.restart(node)  # type: ignore[union-attr]  # _store_node checked it
        print(f"{args.restart} started again and Synced")
        return 0
    if args.kill and args.kill.startswith(STORE_NODE):
        cluster = Cluster.load(args.dir)
        node = _store_node(cluster, args.kill)
        sig = signal.Signals[f"SIG{args.signal.upper().removeprefix('SIG')}"]
        pid = cluster.store.pids[node]  # type: ignore[union-attr]
        if pid is None:
            raise PlaygroundError(f"{args.kill} is not running")
        os.kill(pid, sig)
        print(f"sent {sig.name} to {args.kill} (pid {pid})")
        return 0
    if args.restart:
        cluster = Cluster.load(args.dir)
        for step in cluster.stop(args.restart):
            print(f"{args.restart} {step}")
        pid = cluster.restart(args.restart)
        print(f"{args.restart} started again, pid {pid}, answering on {_address(cluster, args)}")
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
    cluster = _start(args, regions)
    if not args.no_examples:
        create_example_tables(cluster)
    _describe(cluster, args)
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


def _start(args: argparse.Namespace, regions: list[str]) -> Cluster:
    """The cluster, up: on the fixed ports that are free, else on free ones.

    A fixed port found free may be taken by someone else before the component binds it (another
    playground starting at the same moment): the start then fails, and is tried once more with
    free ports only."""
    group = {
        "coordinators": args.coordinators,
        "log_store": args.log_store or ("galera" if args.coordinators > 1 else "file"),
    }
    cluster = Cluster.create(args.dir, regions, proxied=args.proxied, fixed_ports=True, **group)
    try:
        cluster.up()
    except PlaygroundError:
        taken = _fixed_ports_taken(cluster)
        if not taken:
            raise
        print(f"fixed port(s) {', '.join(taken)} taken while starting: trying free ports")
        cluster = Cluster.create(args.dir, regions, proxied=args.proxied, **group)
        cluster.up()
    return cluster


def _fixed_ports_taken(cluster: Cluster) -> list[str]:
    fixed = {COORDINATOR_PORT}
    fixed |= {AGENT_PORT + i for i in range(len(cluster.regions))}
    fixed |= {DATABASE_PORT + i for i in range(len(cluster.regions))}
    addresses = [c.address for c in cluster.components.values()]
    addresses += [link.listen for link in cluster.links]
    ports = {int(address.rsplit(":", 1)[1]) for address in addresses}
    return [str(port) for port in sorted(ports & fixed) if not is_free(port)]


def _store_node(cluster: Cluster, name: str) -> int:
    """The node number of ``store-N`` in the playground's Galera store."""
    number = name.removeprefix(STORE_NODE)
    if cluster.store is None or not number.isdigit() or not 1 <= int(number) <= cluster.store.size:
        size = cluster.store.size if cluster.store is not None else 0
        raise PlaygroundError(
            f"no store node {name!r}: this playground's store has {size} node(s)"
            + ("" if size else " (it logs decisions to a file)")
        )
    return int(number)


def create_example_tables(cluster: Cluster) -> None:
    """The README's example tables, with a few rows, in every region's database."""
    for region in cluster.regions:
        with cluster.mysql(region) as conn, conn.cursor() as cursor:
            for statement in EXAMPLE_TABLES:
                cursor.execute(statement)


def _address(cluster: Cluster, args: argparse.Namespace) -> str:
    if args.restart == "coordinator":
        return cluster.coordinator_address
    return cluster.component(args.restart).address


def _describe(cluster: Cluster, args: argparse.Namespace) -> None:
    """What a user needs to use the cluster: where clients connect, where each database is."""
    print(f"twopc playground up in {cluster.directory} (state file {cluster.state_path})")
    for name, component in cluster.components.items():
        print(f"  {name:<14} {component.address:<22} pid {component.pid}")
    if cluster.store is not None:
        for node, pid in cluster.store.pids.items():
            port = cluster.store.ports[node]
            print(f"  {STORE_NODE}{node:<8} {LOOPBACK}:{port:<16} pid {pid} (decision log, Galera)")
    for link in cluster.links:
        print(f"  link {link.name:<24} {link.listen} -> {link.upstream}")
    address = cluster.coordinator_address
    print()
    tls = cluster.client_tls(CLIENT)
    how = f"with mutual TLS, as the identity {CLIENT!r}" if tls is not None else "in plaintext"
    taken = address != f"{LOOPBACK}:{COORDINATOR_PORT}"
    print(
        f"clients connect to {address} {how}"
        + (f" (port {COORDINATOR_PORT} was taken)" if taken else "")
        + "; twopc tx TXID finds it from here"
    )
    exports = [f"{COORDINATOR_ENV}={address}"] if taken else []
    if tls is not None:
        exports += [f"{ENV_CERT}={tls.cert}", f"{ENV_KEY}={tls.key}", f"{ENV_CA}={tls.ca}"]
    if exports:
        print("for your programs (the README's example), in their shell:")
        print(f"  export {' '.join(exports)}")
    tables = "" if args.no_examples else f"; example tables {', '.join(EXAMPLE_TABLE_NAMES)}"
    print(f"databases (user root, no password, database {DATABASE}{tables}):")
    for region in cluster.regions:
        print(f"  {region:<6} {cluster.component(f'mariadb-{region}').address}")
