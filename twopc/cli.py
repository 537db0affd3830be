"""``twopc``: one command for the daemons, the local playground, the demo and lookups.

twopc coordinator --config coordinator.toml     run the coordinator daemon
twopc agent --config agent.toml                 run a participant agent daemon
twopc playground [--regions eu,us,ap]           start a throwaway local cluster (Ctrl-C stops it)
twopc playground --down                         stop the cluster that the state file names
twopc playground --restart NAME | --kill NAME   restart / signal one component of it
twopc demo                                      bank transfers across regions, a coordinator
                                                SIGKILL mid-run, recovery, invariants checked
twopc chaos [--duration S] [--seed N]           transfers on a proxied playground while kills,
                                                freezes, latency, cuts and failpoints hit it;
                                                a JSON report, a PNG timeline, exit 1 if an
                                                invariant broke
twopc proxy --control ADDR --link N=LISTEN=UP   the TCP fault proxy (the playground runs it)
twopc bench [--workloads ...] [--concurrency ...] twopc against direct XA, SQLAlchemy two-phase
                                                sessions and plain local commits, side by side
twopc bench-recovery [--in-doubt N]             time to resolve N in-doubt transactions after
                                                a coordinator SIGKILL and restart
twopc tx TXID [--coordinator ADDR]              a transaction's state and outcome
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PLAYGROUND_DIR = Path(".twopc-playground")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twopc",
        description="Two-phase commit across MySQL/MariaDB regions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, what in (("coordinator", "the coordinator"), ("agent", "a participant agent")):
        daemon = commands.add_parser(name, help=f"run {what} daemon")
        daemon.add_argument(
            "--config",
            type=Path,
            help="TOML configuration file (environment variables override it)",
        )

    playground = commands.add_parser("playground", help="a throwaway cluster on this machine")
    playground.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_PLAYGROUND_DIR,
        help="where data, logs and the state file go (default: %(default)s)",
    )
    playground.add_argument(
        "--regions", default="eu,us,ap", help="comma-separated region names (default: %(default)s)"
    )
    action = playground.add_mutually_exclusive_group()
    action.add_argument("--down", action="store_true", help="stop the running playground")
    action.add_argument("--restart", metavar="NAME", help="restart one component")
    action.add_argument("--kill", metavar="NAME", help="send a signal to one component")
    action.add_argument(
        "--detach", action="store_true", help="start the cluster and return (stop it with --down)"
    )
    playground.add_argument("--signal", default="KILL", help="signal for --kill (default: KILL)")
    playground.add_argument(
        "--proxied",
        action="store_true",
        help="put a fault proxy on every hop (the state file lists the links)",
    )

    demo = commands.add_parser("demo", help="bank transfers with a coordinator crash mid-run")
    demo.add_argument("--dir", type=Path, default=Path(".twopc-demo"))
    demo.add_argument("--transfers", type=int, default=600)
    demo.add_argument("--workers", type=int, default=8)
    demo.add_argument("--accounts", type=int, default=50, help="accounts per region")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")

    chaos = commands.add_parser("chaos", help="fault injection with an invariant check")
    proxy = commands.add_parser("proxy", help="the TCP fault proxy")
    bench = commands.add_parser("bench", help="twopc against the alternatives, side by side")
    bench_recovery = commands.add_parser(
        "bench-recovery", help="time to resolve in-doubt transactions after a coordinator crash"
    )
    from twopc.testing.bench import recovery as bench_recovery_runner
    from twopc.testing.bench import runner as bench_runner
    from twopc.testing.chaos import proxy_service, runner

    runner.add_arguments(chaos)
    proxy_service.add_arguments(proxy)
    bench_runner.add_arguments(bench)
    bench_recovery_runner.add_arguments(bench_recovery)

    tx = commands.add_parser("tx", help="look a transaction up")
    tx.add_argument("txid")
    tx.add_argument(
        "--coordinator", default="127.0.0.1:7100", help="address (default: %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "coordinator":
        from coordinator.daemon import main as run_coordinator

        return run_coordinator(args.config)
    if args.command == "agent":
        from participants.daemon import main as run_agent

        return run_agent(args.config)
    if args.command == "playground":
        from twopc.testing.playground.command import playground

        return playground(args)
    if args.command == "demo":
        from twopc.testing.playground.demo import run_demo

        return run_demo(args)
    if args.command == "chaos":
        from twopc.testing.chaos.runner import run as run_chaos

        return run_chaos(args)
    if args.command == "bench":
        from twopc.testing.bench.runner import run as run_bench

        return run_bench(args)
    if args.command == "bench-recovery":
        from twopc.testing.bench.recovery import run as run_bench_recovery

        return run_bench_recovery(args)
    if args.command == "proxy":
        from twopc.testing.chaos.proxy_service import run as run_proxy

        return run_proxy(args)
    if args.command == "tx":
        return _show_transaction(args.txid, args.coordinator)
    raise AssertionError(args.command)


def _show_transaction(txid: str, address: str) -> int:
    from twopc.client import Client
    from twopc.errors import TwopcError

    with Client(address) as client:
        try:
            info = client.get_transaction(txid)
        except TwopcError as err:
            print(f"twopc tx: {type(err).__name__}: {err.message}", file=sys.stderr)
            return 1
    print(f"txid:         {info.txid}")
    print(f"state:        {info.state.name}")
    print(f"outcome:      {info.outcome.name}{' (presumed abort)' if info.presumed else ''}")
    if info.participants:
        print(f"participants: {', '.join(info.participants)}")
    if info.abort_reason:
        print(f"reason:       {info.abort_reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
