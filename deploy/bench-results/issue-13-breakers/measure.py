"""How long a transfer touching a failed agent takes to fail before its circuit breaker opens,
and once it is open (issue 13, item 3).

A 2-region playground (MariaDB, agents, coordinator, mutual TLS on loopback), the coordinator's
breakers at 3 failures and a 3 s open period. For each fault (agent ``us`` SIGKILLed; agent
``us`` frozen with SIGSTOP), transfers eu -> us with a 2 s transaction timeout are timed from
the client's call to its error, one after another, by a client that does not retry: those that
fail before the breaker opens (their failures open it), then 20 refused by the open breaker.
Prints medians; under 60 s in all.

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
REFUSALS = 20


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
        outcome = type(err).__name__  # a refusal is twopc.errors.CircuitOpen
    return (time.perf_counter() - started) * 1000, outcome


def fault(cluster: Cluster, kind: str) -> None:
    if kind == "SIGKILL":
        cluster.kill("agent-us", signal.SIGKILL)
    else:
        cluster.component("agent-us").send(signal.SIGSTOP)


def heal(cluster: Cluster, kind: str) -> None:
    if kind == "SIGSTOP":
        cluster.component("agent-us").send(signal.SIGCONT)
    cluster.restart("agent-us")


def summary(samples: list[tuple[float, str]]) -> str:
    took = [ms for ms, _ in samples]
    outcomes = "/".join(sorted({outcome for _, outcome in samples}))
    return (
        f"median {statistics.median(took):7.1f} ms (min {min(took):.1f}, max {max(took):.1f}, "
        f"n={len(took)}, {outcomes})"
    )


def measure(cluster: Cluster, kind: str) -> None:
    with cluster.client(retry_policy=RetryPolicy(attempts=1)) as client:
        wait_until(lambda: transfer(client)[1] == "committed", 30, "a transfer committing")
        healthy = [transfer(client) for _ in range(5)]
        fault(cluster, kind)
        before = []
        while (sample := transfer(client))[1] != "CircuitOpen":
            before.append(sample)
            assert len(before) < 10, before
        refused = [sample, *(transfer(client) for _ in range(REFUSALS - 1))]
        heal(cluster, kind)
    print(f"{kind}: healthy transfer          {summary(healthy)}")
    print(f"{kind}: failed before it opened   {summary(before)}")
    print(f"{kind}: refused, breaker open     {summary(refused)}", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="breakers-") as directory:
        cluster = Cluster.create(
            Path(directory) / "cluster",
            ["eu", "us"],
            coordinator_settings={
                "recovery_interval_s": 0.5,
                "rpc_timeout_s": 2.0,
                "breaker_failures": 3,
                "breaker_open_ms": 3000,
            },
            agent_settings={"pool_size": 4},
        )
        try:
            cluster.up()
            create_accounts(cluster, 2)
            for kind in ("SIGKILL", "SIGSTOP"):
                measure(cluster, kind)
        finally:
            cluster.down(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
