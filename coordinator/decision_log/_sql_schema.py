"""The SQL decision log's tables (SQLAlchemy Core), shared by MariaDB/MySQL and PostgreSQL.

``twopc_log_schema``
    One row (``id`` = 1) holding the schema version. A log whose version is not
    ``SCHEMA_VERSION`` is refused: an older twopc must not write into tables it does not know.
``twopc_commits``
    One row per open COMMIT decision, keyed by (``coordinator_id``, ``txid``). ``seq`` orders
    the decisions of one coordinator (it only grows while rows exist; see ``SqlDecisionLog``);
    ``participants`` is a JSON list of names. An END deletes the row: that is the SQL log's
    compaction.
``twopc_audits``
    The operator's actions, keyed by (``coordinator_id``, ``seq``); the last ``audit_keep`` of a
    coordinator are kept, older ones deleted.

Every row carries the coordinator id, so that several coordinators can share a store (one per
id at a time: a lease per id is issue 12's next step).

Key columns are ASCII with a binary collation on MariaDB/MySQL, so that txids compare byte for
byte there as on PostgreSQL (txids and coordinator ids are ASCII, ``twopc.txid``).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

__all__ = ["AUDITS", "COMMITS", "METADATA", "SCHEMA", "SCHEMA_VERSION", "TXID_LENGTH"]

SCHEMA_VERSION = 1
TXID_LENGTH = 128  # twopc's txids have at most 63 characters (twopc.txid.MAX_TXID)
_ID_LENGTH = 64


def _key(length: int) -> String:
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
    )


def _text() -> Text:
    return Text().with_variant(mysql.MEDIUMTEXT(charset="utf8mb4"), "mysql", "mariadb")


METADATA = MetaData()

SCHEMA = Table(
    "twopc_log_schema",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", Integer, nullable=False),
    mysql_engine="InnoDB",
)

COMMITS = Table(
    "twopc_commits",
    METADATA,
    Column("coordinator_id", _key(_ID_LENGTH), primary_key=True),
    Column("txid", _key(TXID_LENGTH), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("participants", _text(), nullable=False),
    Index("twopc_commits_by_seq", "coordinator_id", "seq"),
    mysql_engine="InnoDB",
)

AUDITS = Table(
    "twopc_audits",
    METADATA,
    Column("coordinator_id", _key(_ID_LENGTH), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("identity", _text(), nullable=False),
    Column("action", _text(), nullable=False),
    Column("txid", _text(), nullable=False),
    Column("outcome", _text(), nullable=False),
    Column("reason", _text(), nullable=False),
    mysql_engine="InnoDB",
)
