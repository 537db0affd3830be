"""The agent's checks of its database: what its user may do, and which tables it writes.

Statements reach the database with the agent's user's rights, whatever the statement guard
lets through. So the database is what keeps them inside the application (issue 10, finding 6),
and the agent checks at start that it will:

- **Its user's rights** (``participants.grants``): nothing server-wide (no FILE: LOAD_FILE
  then returns NULL; no SUPER), nothing on ``mysql``, nothing on a schema beyond ``schemas``,
  no grant option, no role; on the configured schemas no more than reading and writing rows.
  information_schema is asked too (SCHEMATA, and TABLES for a grant to PUBLIC): it shows every
  schema the user reaches, by whatever grant. ``privilege_check = "warn"`` starts anyway.
- **Non-transactional tables**: a base table in a configured schema whose engine does not take
  part in XA (Aria, MyISAM, MEMORY, CSV, ...) keeps a write when its branch rolls back, so an
  aborted transaction would stay applied there. ``nontransactional_tables = "warn"`` starts
  anyway.
- **The marker table**: created when missing (CREATE on that table alone), then read, written
  and deleted from with statements that touch no row, so that a missing right is found now,
  with the GRANT that gives it, rather than at the first branch. Not downgraded by a setting.

Rights can be granted, and tables created or altered, after the agent started. The checks run
again every ``safety_check_interval_s``: while one fails in "refuse" mode the agent starts no
new branch (FailedPrecondition); branches already running finish as usual. MariaDB's
``enforce_storage_engine=InnoDB`` closes that window for tables: the server then refuses to
create or alter a table to another engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from structlog.typing import FilteringBoundLogger

from participants.config import AgentConfig
from participants.grants import Finding, grant_findings, least_grants, quote_name, reach_findings
from participants.xa import DbError, Session, marker_table_ddl
from twopc.errors import FailedPrecondition

# MySQL error numbers of a refused right: table (1142), column (1143), schema (1044), a
# privilege (1227).
_ACCESS_DENIED = {1044, 1142, 1143, 1227}


class DatabaseChecks:
    """The checks above, and the agent's answer to them: refuse or warn."""

    def __init__(self, config: AgentConfig, log: FilteringBoundLogger) -> None:
        self._config = config
        self._name = config.name
        self._schemas = config.statement_schemas
        self._log = log
        self._user = ""
        self._refusal: str | None = None  # set while a later check fails in "refuse" mode
        self._warned: tuple[str, ...] = ()  # findings last logged in "warn" mode

    async def at_start(self, session: Session) -> None:
        """Raises FailedPrecondition when a check fails that its setting does not downgrade."""
        privileges, tables = await self._findings(session)
        problems = self._judge(privileges, tables)
        if problems:
            raise FailedPrecondition(f"participant {self._name} cannot start: {problems}")
        await self._marker_table(session)

    async def again(self, session: Session) -> None:
        """The checks once more, while the agent runs: in "refuse" mode, new branches are
        refused until they pass."""
        privileges, tables = await self._findings(session)
        problems = self._judge(privileges, tables)
        if problems and self._refusal is None:
            self._log.error("refusing_new_branches", reason=problems)
        elif not problems and self._refusal is not None:
            self._log.info("accepting_new_branches_again")
        self._refusal = problems or None

    @property
    def refusal(self) -> str | None:
        """Why new branches are refused now (a later check failed in "refuse" mode); None
        while they are accepted."""
        return self._refusal

    def admit(self) -> None:
        """Raises FailedPrecondition while the last check failed in "refuse" mode."""
        if self._refusal is not None:
            raise FailedPrecondition(
                f"participant {self._name} refuses new branches: {self._refusal}"
            )

    # --- the checks -------------------------------------------------------------------------------

    async def _findings(self, session: Session) -> tuple[list[Finding], list[str]]:
        user = str((await session.execute("SELECT CURRENT_USER()")).rows[0][0])
        name, _, host = user.rpartition("@")
        self._user = f"{quote_name(name)}@{quote_name(host)}"
        # SHOW GRANTS (not FOR CURRENT_USER): it also lists the active role's grants and PUBLIC's.
        grants = [str(row[0]) for row in (await session.execute("SHOW GRANTS")).rows]
        # SCHEMATA leaves out a schema reached through a grant to PUBLIC alone; TABLES has it.
        visible = await session.execute(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA "
            "UNION SELECT TABLE_SCHEMA FROM information_schema.TABLES"
        )
        privileges = grant_findings(
            grants,
            schemas=self._schemas,
            database=self._config.mysql_database,
            marker_table=self._config.marker_table,
            lock_waits=self._config.process_for_lock_waits,
        )
        privileges += reach_findings((str(row[0]) for row in visible.rows), self._schemas)
        marks = ", ".join(["%s"] * len(self._schemas))
        tables = await session.execute(
            "SELECT t.TABLE_SCHEMA, t.TABLE_NAME, COALESCE(t.ENGINE, 'no engine') "
            "FROM information_schema.TABLES t "
            "LEFT JOIN information_schema.ENGINES e ON e.ENGINE = t.ENGINE "
            f"WHERE t.TABLE_SCHEMA IN ({marks}) AND t.TABLE_TYPE <> 'VIEW' "
            "AND COALESCE(e.XA, 'NO') <> 'YES' ORDER BY 1, 2",
            list(self._schemas),
        )
        nontransactional = [
            f"{quote_name(str(schema))}.{quote_name(str(table))} ({engine})"
            for schema, table, engine in tables.rows
        ]
        return privileges, nontransactional

    def _judge(self, privileges: list[Finding], tables: list[str]) -> str:
        """The problems that refuse, as one message ("" when none); logs those that only warn
        (at start, and later when they changed)."""
        refused: list[str] = []
        warned: list[str] = []
        if privileges:
            text = self._privileges_text(privileges)
            (refused if self._config.privilege_check == "refuse" else warned).append(text)
        if tables:
            text = self._tables_text(tables)
            (refused if self._config.nontransactional_tables == "refuse" else warned).append(text)
        if tuple(warned) != self._warned:
            for text in warned:
                self._log.warning("database_checks_failed_warn_only", problem=text)
            self._warned = tuple(warned)
        return " ".join(refused)

    def _privileges_text(self, findings: Sequence[Finding]) -> str:
        needs = least_grants(
            self._user,
            self._schemas,
            self._config.mysql_database,
            self._config.marker_table,
            lock_waits=self._config.process_for_lock_waits,
        )
        return (
            f"its database user {self._user} holds rights the agent does not need: "
            + "; ".join(str(f) for f in findings)
            + f'. The agent needs only: {"; ".join(needs)}. With privilege_check = "warn" '
            "the agent runs anyway."
        )

    def _tables_text(self, tables: Sequence[str]) -> str:
        fixes = "; ".join(f"ALTER TABLE {t.rsplit(' (', 1)[0]} ENGINE=InnoDB" for t in tables)
        return (
            "non-transactional tables in the schemas statements may touch: "
            + ", ".join(tables)
            + ". A write to one is not undone when its branch rolls back, so an aborted "
            f"transaction would stay applied there. Run: {fixes}. With nontransactional_tables "
            '= "warn" the agent runs anyway.'
        )

    async def _marker_table(self, session: Session) -> None:
        """Creates the marker table when it is missing, then checks that the agent can read,
        write and delete its rows; FailedPrecondition with the GRANT to run when not."""
        database, table = self._config.mysql_database, self._config.marker_table
        target = f"{quote_name(database)}.{quote_name(table)}"
        exists = await session.execute(
            "SELECT COUNT(*) FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            [database, table],
        )
        if not exists.rows[0][0]:
            try:
                await session.execute(marker_table_ddl(table))
            except DbError as err:
                if err.errno not in _ACCESS_DENIED:
                    raise
                raise FailedPrecondition(
                    f"participant {self._name} cannot create (or see) its marker table {target}: "
                    f"{err}. "
                    f"Run: GRANT CREATE ON {target} TO {self._user} (or create the table: "
                    f"{' '.join(marker_table_ddl(table).split())})"
                ) from err
        missing = []
        for right, probe in (
            ("SELECT", f"SELECT 1 FROM {target} WHERE 1 = 0"),
            ("INSERT", f"INSERT INTO {target} SELECT * FROM {target} WHERE 1 = 0"),
            ("DELETE", f"DELETE FROM {target} WHERE 1 = 0"),
        ):
            try:
                await session.execute(probe)
            except DbError as err:
                if err.errno not in _ACCESS_DENIED:
                    raise
                # "INSERT command denied ...": INSERT ... SELECT needs SELECT as well
                named = err.message.split(" command denied", 1)[0].strip().upper()
                missing.append(named if named in ("SELECT", "INSERT", "DELETE") else right)
        if missing:
            missing = sorted(set(missing), key=missing.index)
            raise FailedPrecondition(
                f"participant {self._name} cannot use its marker table {target} "
                f"(no {', '.join(missing)}). Run: GRANT {', '.join(missing)} ON {target} TO "
                f"{self._user}"
            )
