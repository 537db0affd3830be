"""How long a transfer touching a failed agent takes to fail, without and with the coordinator's
circuit breakers (issue 13, item 3).

A 2-region playground (MariaDB, agents, coordinator, mutual TLS on loopback). For each fault
(agent ``us`` SIGKILLed; agent ``us`` frozen with SIGSTOP) and each setting (breakers off:
``breaker_failures = 0``; on: 3 failures, open 3 s), transfers eu -> us with a 2 s transaction
timeout are timed from the client's call to its error, one after another, by a client that does
not retry. With breakers on, the breaker is first let open (recovery's calls fail too), then the
refusals are timed. Prints medians; under 60 s in all.

Run from the repository root: ``PYTHONPATH=$PWD .venv/bin/python
deploy/bench-results/issue-13-breakers/measure.py``
"""

from __future__ import annotations

import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from twopc.client import Client, RetryPolicy, TwopcError
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until

TX_TIMEOUT_S = 2.0
OFF_SAMPLES = 3
ON_SAMPLES = 20


def transfer(client: Client) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        client.run(
            {
                "eu": [("UPDATE accounts SET balance = balance - 1 WHERE id = 1", [])],
                "us": [("UPDATE accounts SET balance = balance + 1 WHERE id = 1", [])],
            },
            timeout=TX_TIMEOUT_S,
        )
        outcome = "committed"
    except TwopcError as err:
        outcome = type(err).__name__
    return (time.perf_counter() - started) * 1000, outcome


def use_breakers(cluster: Cluster, on: bool) -> None:
    coordinator = cluster.component("coordinator")
    coordinator.env["TWOPC_COORDINATOR_BREAKER_FAILURES"] = "3" if on else "0"
    coordinator.env["TWOPC_COORDINATOR_BREAKER_OPEN_MS"] = "3000"
    cluster.restart("coordinator")


def fault(cluster: Cluster, kind: str) -> None:
    if kind == "SIGKILL":
        cluster.kill("agent-us", signal.SIGKILL)
    else:
        cluster.component("agent-us").send(signal.SIGSTOP)


def heal(cluster: Cluster, kind: str) -> None:
    if kind == "SIGSTOP":
        cluster.component("agent-us").send(signal.SIGCONT)
    cluster.restart("agent-us")


def measure(cluster: Cluster, kind: str, on: bool) -> None:
    with cluster.client(retry_policy=RetryPolicy(attempts=1)) as client:
        wait_until(lambda: transfer(client)[1] == "committed", 30, "a transfer committing")
        healthy = [transfer(client)[0] for _ in range(5)]
        fault(cluster, kind)
        if on:
            # The refusal's class as the client sees it: twopc.errors.CircuitOpen.
            wait_until(lambda: transfer(client)[1] == "CircuitOpen", 30, "the breaker open")
        samples = [transfer(client) for _ in range(ON_SAMPLES if on else OFF_SAMPLES)]
        heal(cluster, kind)
    took = [ms for ms, _ in samples]
    outcomes = sorted({outcome for _, outcome in samples})
    print(
        f"{kind:8} breakers {'on ' if on else 'off'}: failed transfer median "
        f"{statistics.median(took):8.1f} ms (min {min(took):.1f}, max {max(took):.1f}, "
        f"n={len(took)}, {'/'.join(outcomes)}); healthy transfer median "
        f"{statistics.median(healthy):.1f} ms",
        flush=True,
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="breakers-") as directory:
        cluster = Cluster.create(
            Path(directory) / "cluster",
            ["eu", "us"],
            coordinator_settings={"recovery_interval_s": 0.5, "rpc_timeout_s": 2.0},
            agent_settings={"pool_size": 4},
        )
        try:
            cluster.up()
            create_accounts(cluster, 2)
            for on in (False, True):
                use_breakers(cluster, on)
                for kind in ("SIGKILL", "SIGSTOP"):
                    measure(cluster, kind, on)
        finally:
            cluster.down(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
