"""``twopc bench``: twopc measured against its baselines on one proxied playground.

Run it (a fresh cluster in ``--dir``, reports in ``--out``)::

    twopc bench --workloads transfer2,flash-pessimistic --concurrency 1,8,32,128 \\
        --latency-ms 0,5,50 --duration 10 --warmup 2 --out bench-results
    python -m twopc.testing.bench.runner ...   # the same, without the twopc command

Each cell (workload x injected round trip x concurrency) runs every system in turn on the same
databases, the data reset in between:

- ``twopc``: the SDK through the coordinator and the agents;
- ``direct-xa``: XA driven from the benchmark process itself, no coordinator, no decision log;
- ``sqla-twophase``: SQLAlchemy ``Session(twophase=True)`` across one engine per region;
- ``local``: plain local commits with no atomicity (the upper bound).

The workloads are ``transfer2``, ``transfer3``, ``flash-pessimistic``, ``flash-optimistic`` and
``read-mostly`` (see ``workloads``). Per cell and system the report has throughput, p50/p95/p99
latency, the share of attempts that did not commit, CPU seconds per 1,000 transactions (coordinator,
agents, MariaDB, proxy, the benchmark itself), peak RSS, the decision log's fsyncs per commit,
TIME_WAIT sockets, and twopc's throughput and p50 divided by each baseline's: ``bench.json``
(machines), ``bench.md`` (people) and ``bench.png`` (throughput and p99 against concurrency).

Keep the machine otherwise idle for figures that mean something: clients, coordinator, agents,
proxy and databases all share its cores.

The command's entry points are ``twopc.testing.bench.runner.add_arguments`` and ``run``; this
package imports nothing itself, so that ``python -m twopc.testing.bench.runner`` runs cleanly.
"""
