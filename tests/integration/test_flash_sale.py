"""``twopc flash-sale`` end to end, and its Redis stock gate against a real Redis.

The end-to-end run sells a small stock in every mode on a real playground (MariaDB regions,
agents, the coordinator), a real Redis (SIGKILLed mid-sale by the runner) and a real RabbitMQ,
and reads its JSON report: every mode sells out without an oversell, a lost or a doubled order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from twopc.testing.flash_sale.gate import GateDown, StockGate
from twopc.testing.playground.redis_server import RedisInstance

STOCK = 60


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = RedisInstance(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_the_gate_admits_as_many_buyers_as_units_and_gives_back(
    redis_server: RedisInstance,
) -> None:
    gate = StockGate(redis_server.url, "stock:1", lambda: 5)
    try:
        assert [gate.take() for _ in range(7)] == [True] * 5 + [False] * 2
        assert gate.seeds == 1
        gate.give_back()  # a transaction that did not commit
        assert [gate.take(), gate.take()] == [True, False]
    finally:
        gate.close()


def test_a_restarted_gate_is_seeded_from_the_database_never_from_give_backs(
    redis_server: RedisInstance,
) -> None:
    in_database = [10]
    gate = StockGate(redis_server.url, "stock:1", lambda: in_database[0])
    try:
        assert all(gate.take() for _ in range(4))
        redis_server.kill()  # SIGKILL: the counter is gone
        with pytest.raises(GateDown):
            gate.take()
        redis_server.start()
        gate.give_back()  # given back to no counter: the seed will count that unit
        in_database[0] = 7  # 3 sold and committed meanwhile
        assert [gate.take() for _ in range(8)] == [True] * 7 + [False]
        assert gate.seeds == 2
    finally:
        gate.close()


@pytest.mark.timeout(240)
def test_every_mode_sells_out_without_oversell_loss_or_double(tmp_path: Path) -> None:
    out = tmp_path / "report"
    command = [
        sys.executable, "-m", "twopc.cli", "flash-sale",
        "--buyers", "8", "--stock", str(STOCK), "--wallets", "40", "--duration", "25",
        "--after-s", "0.5", "--dir", str(tmp_path / "sale"), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {r["mode"]: r for r in json.loads((out / "flash-sale.json").read_text())}
    assert set(results) == {"2pc-pessimistic", "2pc-optimistic", "gate-2pc", "mq-outbox"}
    for mode, result in results.items():
        assert (result["oversell"], result["lost"], result["doubled"]) == (0, 0, 0), mode
        assert result["unpaid_or_overpaid"] == 0, mode
        assert 0 < result["orders"] <= STOCK, mode
    for mode in ("2pc-pessimistic", "gate-2pc", "mq-outbox"):
        assert results[mode]["orders"] == STOCK, mode  # sold out within the duration
        assert results[mode]["answers"]["bought"] == STOCK, mode
        assert results[mode]["answers"]["sold_out"] >= 1, mode
    gate_events = " ".join(results["gate-2pc"]["events"])
    assert "Redis SIGKILLed and restarted empty" in gate_events
    queue = results["mq-outbox"]
    assert queue["lag_p50_ms"] is not None
    assert queue["lag_p99_ms"] >= queue["lag_p50_ms"]
    assert f"consumer applied {STOCK}," in " ".join(queue["events"])
    assert (out / "flash-sale.png").stat().st_size > 0
    assert "| sale | mq-outbox |" in (out / "flash-sale.md").read_text()
