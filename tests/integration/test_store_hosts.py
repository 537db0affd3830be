"""The SQL store's connections: plain unless the URL asks for TLS (PyMySQL would build an SSL
context per connection), and a MariaDB store given several hosts fails over to the next one
that answers, and stays there."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from coordinator.decision_log.sql_log import asks_for_tls, connect_args, store_url
from coordinator.decision_log.store_hosts import failover_creator, parse_hosts
from tests.sql_stores import Stores
from twopc.testing.playground.ports import free_port


def test_a_store_connection_is_plain_unless_its_url_asks_for_tls() -> None:
    assert connect_args(postgres=False, timeout_s=5)["ssl_disabled"] is True
    assert "ssl_disabled" not in connect_args(postgres=False, timeout_s=5, tls=True)
    assert not asks_for_tls(make_url("mysql+pymysql://u@h:3306/db"))
    assert asks_for_tls(make_url("mysql+pymysql://u@h:3306/db?ssl_ca=/etc/ca.pem"))


def test_store_hosts_are_host_and_port() -> None:
    assert parse_hosts(["10.0.0.2:3306", "db3:3307"]) == [("10.0.0.2", 3306), ("db3", 3307)]
    for bad in ("db3", ":3306", "db3:", "db3:0", "db3:70000", "db3:x"):
        with pytest.raises(ValueError, match="host:port"):
            parse_hosts([bad])


def test_a_dead_first_host_is_passed_over_and_the_live_one_kept(sql_stores: Stores) -> None:
    live = store_url(sql_stores.new_database("mariadb"))
    dead_port = free_port()
    url = live.set(port=dead_port)  # the URL's own host answers nothing
    creator = failover_creator(
        url, [f"127.0.0.1:{live.port}"], connect_args(postgres=False, timeout_s=2)
    )
    engine = create_engine(url, poolclass=NullPool, creator=creator)
    try:
        for _ in range(3):
            with engine.connect() as conn:
                port = conn.execute(text("SELECT @@port")).scalar_one()
                assert port == live.port
                assert conn.execute(text("SHOW STATUS LIKE 'Ssl_cipher'")).one()[1] == ""
    finally:
        engine.dispose()
