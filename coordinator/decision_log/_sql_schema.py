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
``twopc_leases`` (since version 2)
    One row per coordinator id: the member (``holder``) that may act for it, the ``epoch`` of
    that holding (one more at every acquisition), and ``expires_at`` in the STORE's clock
    (UTC). See ``leases``; the log's writes are fenced on (holder, epoch).
``twopc_requests`` (since version 3)
    One row per (owner, request id) used in a coordinator group: ``owner_hash`` (the sha256 hex
    of the identity that sent it), ``request_id``, the ``txid`` that claimed it (unique: a txid
    answers one request of one identity) and ``created_at`` in the store's clock. A request
    retried on another member finds here the transaction it ran as (``request_claims``).

Every row carries the coordinator id, so that several coordinators can share a store, one member
per id at a time (the lease).

Versions: 1 had no ``twopc_leases``, 2 no ``twopc_requests``; opening a version-1 or version-2
log creates the missing tables and moves the version to 3 (nothing else changed). Any other
version is refused.

Key columns are ASCII with a binary collation on MariaDB/MySQL, so that txids compare byte for
byte there as on PostgreSQL (txids and coordinator ids are ASCII, ``twopc.txid``).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.schema import CreateIndex, CreateTable

from coordinator.decision_log import DecisionLogCorrupted

__all__ = [
    "AUDITS",
    "COMMITS",
    "LEASES",
    "MEMBER_LENGTH",
    "METADATA",
    "OWNER_HASH_LENGTH",
    "REQUESTS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TXID_LENGTH",
    "ensure_schema",
]

SCHEMA_VERSION = 3
# Versions whose tables are a subset of this one's: CREATE TABLE IF NOT EXISTS upgrades them.
_UPGRADABLE = {1, 2}
MEMBER_LENGTH = 255
TXID_LENGTH = 128  # twopc's txids have at most 63 characters (twopc.txid.MAX_TXID)
_ID_LENGTH = 64
OWNER_HASH_LENGTH = 64  # sha256, hex
_REQUEST_ID_LENGTH = 64  # twopc's request ids have at most 40 characters (twopc.txid)


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

LEASES = Table(
    "twopc_leases",
    METADATA,
    Column("coordinator_id", _key(_ID_LENGTH), primary_key=True),
    Column("holder", String(MEMBER_LENGTH), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    # The store's clock, UTC: microseconds on both stores (DATETIME(6) / timestamptz).
    Column(
        "expires_at",
        DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
        nullable=False,
    ),
    mysql_engine="InnoDB",
)

REQUESTS = Table(
    "twopc_requests",
    METADATA,
    Column("owner_hash", _key(OWNER_HASH_LENGTH), primary_key=True),
    Column("request_id", _key(_REQUEST_ID_LENGTH), primary_key=True),
    Column("txid", _key(TXID_LENGTH), nullable=False),
    Column(
        "created_at",
        DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
        nullable=False,
    ),
    Index("twopc_requests_by_txid", "txid", unique=True),
    Index("twopc_requests_by_age", "created_at"),
    mysql_engine="InnoDB",
)


def ensure_schema(conn: Connection, name: str) -> None:
    """Nothing when the version row says ``SCHEMA_VERSION``; else CREATE TABLE IF NOT EXISTS
    each table, then the version row if missing, or moves a version this one extends
    (``_UPGRADABLE``) to ``SCHEMA_VERSION``. Concurrent first opens may race on the version
    row: the loser finds the winner's.

    Raises:
        DecisionLogCorrupted: the tables are of another schema version (left untouched).
    """
    version = None
    try:
        version = conn.execute(select(SCHEMA.c.version).where(SCHEMA.c.id == 1)).scalar()
    except ProgrammingError:  # no table yet: created below
        conn.rollback()
    conn.rollback()
    if version == SCHEMA_VERSION:
        # No DDL on a store in use: on PostgreSQL, CREATE INDEX IF NOT EXISTS takes a SHARE lock
        # on its table, which waits for every batch in flight and holds up the next ones.
        return
    if version is not None and version not in _UPGRADABLE:
        raise _unknown(name, version)
    for table in METADATA.sorted_tables:
        conn.execute(CreateTable(table, if_not_exists=True))
        for index in table.indexes:
            conn.execute(CreateIndex(index, if_not_exists=True))
    conn.commit()
    version = conn.execute(select(SCHEMA.c.version).where(SCHEMA.c.id == 1)).scalar()
    if version is None:
        try:
            conn.execute(SCHEMA.insert().values(id=1, version=SCHEMA_VERSION))
            conn.commit()
        except IntegrityError:
            conn.rollback()
        version = conn.execute(select(SCHEMA.c.version).where(SCHEMA.c.id == 1)).scalar()
    elif version in _UPGRADABLE:
        conn.execute(
            update(SCHEMA).where(SCHEMA.c.id == 1, SCHEMA.c.version == version),
            {"version": SCHEMA_VERSION},
        )
        conn.commit()
        version = conn.execute(select(SCHEMA.c.version).where(SCHEMA.c.id == 1)).scalar()
    conn.commit()
    if version != SCHEMA_VERSION:
        raise _unknown(name, version)


def _unknown(name: str, version: object) -> DecisionLogCorrupted:
    return DecisionLogCorrupted(
        f"the decision log in {name} has schema version {version}, and this twopc reads "
        f"version {SCHEMA_VERSION} (and upgrades {sorted(_UPGRADABLE)}) only (a newer twopc "
        "wrote it?). It was left untouched; run a twopc that knows that version"
    )
