"""The statement guard: what runs inside an XA branch and what is refused before the server."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymysql.converters import escape_string

from participants.config import AgentConfig
from twopc.errors import InvalidArgument
from twopc.sql_guard import (
    DEFAULT_MARKER_TABLE,
    CheckedStatement,
    StatementKind,
    check_statement,
)

READ = StatementKind.READ
WRITE = StatementKind.WRITE
MARKER = "twopc_branch_marker"


def check(sql: str, placeholders: int = 0) -> CheckedStatement:
    return check_statement(sql, placeholders=placeholders, protected_tables=(MARKER,))


def refused(sql: str, placeholders: int = 0) -> str:
    with pytest.raises(InvalidArgument) as caught:
        check(sql, placeholders)
    return caught.value.message


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        # The allow-list.
        ("SELECT 1", READ),
        ("select * from t where id = 1", READ),
        ("VALUES (1), (2)", READ),
        ("TABLE t", READ),
        ("INSERT INTO t (a) VALUES (1)", WRITE),
        ("insert into t select * from u", WRITE),
        ("UPDATE t SET a = a + 1 WHERE id = 2", WRITE),
        ("DELETE FROM t WHERE id = 3", WRITE),
        ("REPLACE INTO t VALUES (1)", WRITE),
        ("INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = a + 1", WRITE),
        # Leading whitespace, comments and parentheses.
        ("  \n\tSELECT 1", READ),
        ("(SELECT 1) UNION (SELECT 2)", READ),
        ("((SELECT 1))", READ),
        ("/* ; */ SELECT 1", READ),
        ("-- comment\nUPDATE t SET a = 1", WRITE),
        ("# comment\nDELETE FROM t", WRITE),
        ("/**/SELECT 1", READ),
        ("/*+ BKA(t) */ SELECT 1", READ),
        ("SELECT /*+ MAX_EXECUTION_TIME(1000) */ 1", READ),
        # WITH: the main statement decides.
        ("WITH x AS (SELECT 1) SELECT * FROM x", READ),
        ("WITH x AS (SELECT 1) DELETE FROM t WHERE a IN (SELECT * FROM x)", WRITE),
        ("with x as (select 1) update t join x on t.a = x.a set t.b = 1", WRITE),
        ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", WRITE),
        ("WITH x AS (SELECT 1) (SELECT * FROM x) UNION (SELECT 2)", READ),
        ("WITH x (a, b) AS (SELECT 1, 2), y AS (SELECT a FROM x) SELECT * FROM y", READ),
        ("WITH `del` AS (SELECT 1) SELECT * FROM `del`", READ),
        (
            "WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) TABLE n",
            READ,
        ),
        ("WITH x AS (SELECT 'UPDATE') SELECT * FROM x", READ),
        ("WITH x AS (DELETE FROM t) SELECT * FROM x", READ),  # not valid SQL; reads at most
        (
            "WITH RECURSIVE n (i) AS (SELECT 1 UNION SELECT i + 1 FROM n) CYCLE i RESTRICT "
            "DELETE FROM t WHERE a IN (SELECT i FROM n)",
            WRITE,
        ),
        ("(WITH x AS (SELECT 1) SELECT * FROM x)", READ),
        # Locking reads are reads; system variables may be read; SLEEP is a slow query.
        ("SELECT * FROM t WHERE id = 1 FOR UPDATE", READ),
        ("SELECT * FROM t LOCK IN SHARE MODE", READ),
        ("SELECT @@session.sql_mode, @@tx_isolation", READ),
        ("SELECT 'a@b', `x@y`, '@v' /* @v */", READ),
        ("SELECT SLEEP(1), BENCHMARK(10, 1)", READ),
        ("SELECT get_lock_count FROM t", READ),  # a column, not a call
        ("SELECT * FROM locks WHERE is_used_lock = 1", READ),
        ("SELECT 'GET_LOCK(1)', `load_file` FROM t", READ),
        ("INSERT INTO dumpfile VALUES (1)", WRITE),  # DUMPFILE is not reserved: a table name
        ("INSERT INTO dumpfile (a) VALUES (1)", WRITE),
        # Quotes and escapes hide what they contain.
        ("SELECT ';'", READ),
        ('SELECT "a\\"; XA COMMIT"', READ),
        ("SELECT 'it''s; XA COMMIT'", READ),
        ("SELECT 'a\\'; COMMIT; '", READ),
        ("SELECT '\\\\', ';'", READ),
        ("SELECT `a;b` FROM t", READ),
        ("SELECT `a``;b` FROM t", READ),
        ("SELECT `a\\` FROM t", READ),  # no backslash escape in backticks
        ("SELECT '/*', '--', '#'", READ),
        ("SELECT 'INTO OUTFILE x'", READ),
        ("SELECT 'twopc_branch_marker'", READ),
        ("SELECT 1 AS `twopc_branch_marker2`", READ),
        ("SELECT * FROM twopc_branch_markers", READ),
        ("SELECT * FROM my_twopc_branch_marker", READ),
        # Comments hide what they contain.
        ("SELECT 1 -- ;\n", READ),
        ("SELECT 1 -- ; XA COMMIT", READ),
        ("SELECT 1 --\tx; COMMIT", READ),
        ("SELECT 1 --", READ),
        ("SELECT 1 # ; COMMIT", READ),
        ("SELECT 1 /* ; COMMIT */", READ),
        ("SELECT 1 /* /*! nested is not special here */", READ),
        ("SELECT 2--1", READ),  # '--x' is not a comment: 2 - -1
        ("SELECT 1 --x", READ),
        ("SELECT 1 FROM t WHERE a = 1#x", READ),
        # One trailing ';'.
        ("SELECT 1;", READ),
        ("SELECT 1; ", READ),
        ("SELECT 1;\n-- done\n", READ),
        ("SELECT 1; /* done */ # really", READ),
        # Percent signs without parameters are left alone (pymysql does not format).
        ("SELECT 5 % 2", READ),
        ("SELECT * FROM t WHERE a LIKE 'x%'", READ),
        ("SELECT '%s'", READ),
        # Protected names are case-insensitive whole identifiers only.
        ("SELECT twopc_branch_marker_id FROM t", READ),
    ],
)
def test_accepted(sql: str, kind: StatementKind) -> None:
    checked = check(sql)
    assert checked.kind is kind
    assert checked.sql is sql


@pytest.mark.parametrize(
    ("sql", "placeholders", "kind"),
    [
        ("UPDATE t SET a = %s WHERE id = %s", 2, WRITE),
        ("SELECT * FROM t WHERE a LIKE 'x%%' AND b = %s", 1, READ),
        ("SELECT 5 %% 2, %s", 1, READ),
        ("SELECT %s /* 100%% */", 1, READ),
        ("SELECT `a%%b`, %s FROM t", 1, READ),
        ("SELECT '%%s', %s", 1, READ),
        ("SELECT %s, %s, %s", 3, READ),
        ("INSERT INTO t VALUES (%s)", 1, WRITE),
        ("SELECT 1 %%s", 0, READ),  # '%%' then 's': no placeholder
    ],
)
def test_placeholders_accepted(sql: str, placeholders: int, kind: StatementKind) -> None:
    assert check(sql, placeholders).kind is kind


@pytest.mark.parametrize(
    ("sql", "placeholders", "message"),
    [
        ("UPDATE t SET a = %s WHERE id = %s", 3, "statement has 2 '%s' placeholders but 3 "),
        ("SELECT %s", 0, "statement has 1 '%s' placeholder but 0 parameters were given"),
        ("SELECT 1", 1, "statement has 0 '%s' placeholders but 1 parameter was given"),
        ("SELECT ';' , %s", 2, "has 1 '%s' placeholder but 2 parameters"),
        ("SELECT '%s'", 1, "'%s' inside a quoted string at offset 8 would be replaced"),
        ("SELECT 1 -- %s\n, %s", 1, "'%s' inside a comment at offset 12"),
        ("SELECT `%s`, %s", 1, "'%s' inside a quoted identifier"),
        ("SELECT * FROM t WHERE a LIKE 'x%' AND b = %s", 1, "lone '%' inside a quoted string"),
        ("SELECT 5 % 2, %s", 1, "lone '%' at offset 9: when parameters are given"),
        ("SELECT %d", 1, "lone '%' at offset 7"),
        ("SELECT %(a)s", 1, "lone '%'"),
        ("SELECT %s /* 100% */", 1, "lone '%' inside a comment"),
        ("SELECT %s, '%%%'", 1, "lone '%' inside a quoted string at offset 14"),
    ],
)
def test_placeholders_refused(sql: str, placeholders: int, message: str) -> None:
    assert message in refused(sql, placeholders)


def test_percent_message_tells_the_fix() -> None:
    message = refused("SELECT 'x%', %s", 1)
    assert "'%%'" in message
    assert "parameter" in message


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        # XA and transaction control.
        ("XA COMMIT 'x'", "XA statements are not allowed inside a twopc transaction"),
        ("  xa   start 'x'", "XA statements are not allowed"),
        ("/* hi */ Xa END 'x'", "XA statements are not allowed"),
        ("(XA RECOVER)", "XA statements are not allowed"),
        ("COMMIT", "transaction control (COMMIT) is not allowed"),
        ("commit work", "transaction control (COMMIT)"),
        ("ROLLBACK", "transaction control (ROLLBACK)"),
        ("ROLLBACK TO SAVEPOINT s", "transaction control (ROLLBACK)"),
        ("BEGIN", "transaction control (BEGIN)"),
        ("START TRANSACTION", "transaction control (START)"),
        ("SAVEPOINT s", "transaction control (SAVEPOINT)"),
        ("RELEASE SAVEPOINT s", "transaction control (RELEASE)"),
        # SET.
        ("set autocommit=1", "SET autocommit is not allowed"),
        ("SET @@autocommit = 0", "SET autocommit is not allowed"),
        ("SET SESSION autocommit = ON", "SET autocommit is not allowed"),
        ("SET NAMES latin1", "SET is not allowed inside a twopc transaction"),
        ("SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED", "SET is not allowed"),
        ("SET @a = 1", "SET is not allowed"),
        # DDL.
        ("CREATE TABLE t (a INT)", "CREATE (DDL) is not allowed"),
        ("alter table t add b int", "ALTER (DDL) is not allowed"),
        ("DROP TABLE t", "DROP (DDL) is not allowed"),
        ("TRUNCATE t", "TRUNCATE (DDL) is not allowed"),
        ("RENAME TABLE a TO b", "RENAME (DDL) is not allowed"),
        # Others with their own reason.
        ("LOCK TABLES t WRITE", "LOCK TABLES is not allowed"),
        ("UNLOCK TABLES", "UNLOCK TABLES is not allowed"),
        ("CALL p()", "CALL is not allowed"),
        ("LOAD DATA INFILE '/etc/passwd' INTO TABLE t", "LOAD statements are not allowed"),
        ("LOAD DATA LOCAL INFILE 'x' INTO TABLE t", "LOAD statements are not allowed"),
        ("HANDLER t OPEN", "HANDLER is not allowed"),
        ("DO SLEEP(1)", "DO is not allowed"),
        # Everything else.
        ("GRANT ALL ON *.* TO u", "GRANT statements are not allowed"),
        ("REVOKE ALL ON *.* FROM u", "REVOKE statements are not allowed"),
        ("FLUSH TABLES", "FLUSH statements are not allowed"),
        ("KILL 12", "KILL statements are not allowed"),
        ("SHUTDOWN", "SHUTDOWN statements are not allowed"),
        ("PREPARE s FROM 'COMMIT'", "PREPARE statements are not allowed"),
        ("EXECUTE s", "EXECUTE statements are not allowed"),
        ("SHOW TABLES", "SHOW statements are not allowed"),
        ("USE other", "USE statements are not allowed"),
        (
            "EXPLAIN SELECT 1",
            "only SELECT, WITH, VALUES, TABLE, INSERT, UPDATE, DELETE and REPLACE",
        ),
        ("'SELECT 1'", "statement must start with a keyword such as SELECT or INSERT"),
        ("@a := 1", "statement must start with a keyword"),
        ("1 + 1", "statement must start with a keyword"),
        ("SELECTé 1", "statement must start with a keyword"),
        ("\u017felect 1", "statement must start with a keyword"),  # only ASCII spells a keyword
        # Multiple statements.
        ("SELECT 1; SELECT 2", "only one statement per request: found ';' at offset 8"),
        ("SELECT 1;XA COMMIT 'x'", "found ';' at offset 8"),
        ("SELECT 1;;", "only one statement per request"),
        ("SELECT 1; 'x'", "only one statement per request"),
        ("SELECT 1; `x`", "only one statement per request"),
        ("SELECT 1; %s", "only one statement per request"),
        ("SELECT 1--x; COMMIT", "found ';' at offset 11"),
        ("SELECT 1 -- x\n; COMMIT", "only one statement per request"),
        ("SELECT 1 /* x */; COMMIT", "only one statement per request"),
        ("SELECT 'a'; DROP TABLE t", "only one statement per request"),
        ("SELECT 1;\u00a0", "only one statement per request"),  # not whitespace to MySQL
        ("; SELECT 1", "only one statement per request"),
        # Executable comments.
        ("/*!50000 COMMIT */", "executable comment '/*!' at offset 0 is not allowed"),
        ("SELECT 1 /*! , 2 */", "executable comment"),
        ("SELECT 1 /*M!100000 INTO OUTFILE '/tmp/x' */", "executable comment '/*M!'"),
        ("SELECT 1; /*!COMMIT*/", "executable comment"),
        ("SELECT /*+ QB_NAME(`*/ 1 INTO OUTFILE '/x' -- `) */ 1", "optimizer hint at offset 7"),
        # Files on the server.
        ("SELECT * FROM t INTO OUTFILE '/tmp/x'", "SELECT ... INTO OUTFILE is not allowed"),
        ("select * into outfile '/tmp/x' from t", "INTO OUTFILE is not allowed"),
        ("SELECT 1 INTO /* x */ OUTFILE '/tmp/x'", "INTO OUTFILE is not allowed"),
        ("SELECT 1 INTO DUMPFILE '/tmp/x'", "INTO DUMPFILE is not allowed"),
        ('SELECT 1 INTO DUMPFILE "/tmp/x"', "INTO DUMPFILE is not allowed"),
        ("SELECT 1 INTO DUMPFILE %s", "INTO DUMPFILE is not allowed"),
        ("SELECT LOAD_FILE('/etc/passwd')", "LOAD_FILE is not allowed"),
        ("select load_file /* x */ ('/etc/passwd')", "LOAD_FILE is not allowed"),
        # Session state that would outlive the transaction on a pooled session.
        ("SELECT GET_LOCK('x', 0)", "GET_LOCK is not allowed inside a twopc transaction"),
        ("SELECT get_lock ('x', 0)", "GET_LOCK is not allowed"),
        ("SELECT GET_LOCK/**/('x', 0)", "GET_LOCK is not allowed"),
        ("SELECT 1 FROM t WHERE RELEASE_LOCK('x')", "RELEASE_LOCK is not allowed"),
        ("SELECT RELEASE_ALL_LOCKS()", "RELEASE_ALL_LOCKS is not allowed"),
        ("SELECT IS_FREE_LOCK('x')", "IS_FREE_LOCK is not allowed"),
        ("SELECT IS_USED_LOCK('x')", "IS_USED_LOCK is not allowed"),
        ("UPDATE t SET a = GET_LOCK('x', 0)", "GET_LOCK is not allowed"),
        ("SELECT a INTO @a FROM t WHERE id = 1", "user variables (@name) are not allowed"),
        ("SELECT a FROM t INTO @a, @b", "user variables (@name) are not allowed"),
        ("SELECT @v", "user variables (@name) are not allowed"),
        ("SELECT @v := 1", "user variables"),
        ("SELECT @'v', 1", "user variables"),
        ("SELECT @`v`", "user variables"),
        ("UPDATE t SET a = (@v := a) WHERE id = 1", "user variables"),
        ("SELECT @@@v", "user variables"),
        ("SELECT 1 INTO DUMPFILE", "INTO DUMPFILE is not allowed"),
        ("WITH x AS (SELECT 1) SELECT * FROM x INTO OUTFILE '/x'", "INTO OUTFILE is not allowed"),
        # The marker table.
        ("SELECT * FROM twopc_branch_marker", "refers to 'twopc_branch_marker'"),
        ("SELECT * FROM `TWOPC_BRANCH_MARKER`", "refers to 'TWOPC_BRANCH_MARKER'"),
        ("SELECT * FROM db.twopc_branch_marker", "refers to 'twopc_branch_marker'"),
        ("SELECT * FROM `db`.`twopc_branch_marker`", "a table the twopc agent keeps"),
        ("SELECT * FROM db . Twopc_Branch_Marker", "refers to 'Twopc_Branch_Marker'"),
        ('SELECT * FROM "twopc_branch_marker"', "refers to"),  # an identifier under ANSI_QUOTES
        ("DELETE FROM twopc_branch_marker", "refers to"),
        ("INSERT INTO twopc_branch_marker VALUES (1)", "refers to"),
        ("UPDATE t, twopc_branch_marker m SET t.a = 1", "refers to"),
        ("TABLE twopc_branch_marker", "refers to"),
        ("SELECT * FROM t WHERE a IN (SELECT x FROM twopc_branch_marker)", "refers to"),
        ("SELECT * FROM twopc_branch_marker\U0001f600", "refers to"),
        ("SELECT * FROM twopc_branch_mar\u212aer", "refers to"),  # Kelvin sign lower-cases to k
        # Broken lexing.
        ("", "empty statement"),
        ("   \n ", "empty statement"),
        ("/* nothing */ -- here\n", "empty statement"),
        (";", "empty statement"),
        ("(", "empty statement"),
        ("SELECT 'abc", "unterminated quoted string starting at offset 7"),
        ('SELECT "abc\\"', "unterminated quoted string starting at offset 7"),
        ("SELECT 'abc''", "unterminated quoted string"),
        ("SELECT `abc", "unterminated quoted identifier starting at offset 7"),
        ("SELECT 1 /* abc", "unterminated /* comment starting at offset 9"),
        ("SELECT 1 /* abc *", "unterminated /* comment"),
        ("SELECT 1 # x\x00 INTO OUTFILE '/x'", "NUL character at offset 12 is not allowed"),
        # WITH without a statement twopc understands.
        ("WITH x AS (SELECT 1)", "could not find the SELECT, INSERT, UPDATE or DELETE"),
        ("WITH x AS (SELECT 1) XA COMMIT 'x'", "after the WITH clause"),
        ("WITH x AS (SELECT 1), SELECT 1", "after the WITH clause"),
        ("WITH x (SELECT 1) SELECT 1", "after the WITH clause"),
        ("WITH x AS SELECT 1", "after the WITH clause"),
        ("WITH x AS (SELECT 1", "after the WITH clause"),
        ("WITH RECURSIVE x AS (SELECT 1) CYCLE a", "after the WITH clause"),
        ("WITH", "after the WITH clause"),
    ],
)
def test_refused(sql: str, message: str) -> None:
    assert message in refused(sql)


def test_protected_tables_default_to_none() -> None:
    checked = check_statement("SELECT * FROM twopc_branch_marker", placeholders=0)
    assert checked.kind is READ


def test_protected_names_compare_case_insensitively() -> None:
    with pytest.raises(InvalidArgument, match="refers to 'marker'"):
        check_statement("SELECT * FROM marker", placeholders=0, protected_tables={"MARKER"})


def test_non_ascii_protected_name() -> None:
    with pytest.raises(InvalidArgument, match="refers to"):
        check_statement("SELECT * FROM ÉTAT", placeholders=0, protected_tables=["état"])


def test_messages_name_the_offending_semicolon() -> None:
    sql = "UPDATE t SET a = 1 WHERE id = 2; XA COMMIT 'x'"
    assert refused(sql) == f"only one statement per request: found ';' at offset {sql.index(';')}"


# Properties.

_SEPARATORS = st.sampled_from(["", " ", "\n", " /* c */ ", "-- c\n", "# c\n", "\t"])
_SECOND = st.sampled_from(
    ["SELECT 1", "XA COMMIT 'x'", "COMMIT", "DROP TABLE t", "UPDATE t SET a = 1", "x", "'s'", "("]
)


def literal(text: str) -> str:
    """``text`` as a single-quoted MySQL literal, escaped the way pymysql escapes parameters."""
    return "'" + escape_string(text) + "'"


@given(st.text())
def test_any_string_literal_is_a_read(text: str) -> None:
    sql = f"SELECT {literal(text)}"
    assert check(sql).kind is READ


@given(st.text())
def test_any_string_literal_with_doubled_percents_is_a_read_with_parameters(text: str) -> None:
    sql = f"SELECT {literal(text).replace('%', '%%')}, %s"
    assert check(sql, 1).kind is READ


@given(st.text(), st.text())
def test_a_lone_percent_in_a_literal_is_refused_with_parameters(before: str, after: str) -> None:
    text = before.replace("%", "") + "%" + after.replace("%", "")
    message = refused(f"SELECT {literal(text)}, %s", 1)
    assert re.search(r"(lone '%'|'%s') inside a quoted string", message)


@given(st.text(), _SEPARATORS, _SECOND, st.text())
def test_a_second_statement_is_refused(text: str, separator: str, second: str, tail: str) -> None:
    sql = f"SELECT {literal(text)};{separator}{second}{tail}"
    with pytest.raises(InvalidArgument):
        check(sql)


@given(st.text())
def test_any_text_is_accepted_or_refused_cleanly(sql: str) -> None:
    try:
        checked = check_statement(sql, placeholders=sql.count("%s"), protected_tables=(MARKER,))
    except InvalidArgument:
        return
    assert checked.sql is sql


@given(st.text(alphabet=st.sampled_from(list("'\"`;%s-#/*!\n (SELECTxa\\"))))
def test_lexing_characters_never_crash(sql: str) -> None:
    for placeholders in (0, 1):
        with contextlib.suppress(InvalidArgument):
            check_statement(sql, placeholders=placeholders, protected_tables=(MARKER,))


@given(st.text(alphabet=st.sampled_from(list("'\"`%s;-# \n/*(SELECT1"))))
def test_accepted_with_parameters_means_pymysql_can_format_it(tail: str) -> None:
    sql = f"SELECT %s {tail}"
    for placeholders in range(1, 6):
        try:
            check(sql, placeholders)
        except InvalidArgument:
            continue
        # What pymysql does with the escaped parameters: it must neither fail nor eat a '%'
        # that the guard did not count as a placeholder.
        formatted = sql % (("'v'",) * placeholders)
        assert formatted.count("'v'") >= placeholders


@pytest.mark.parametrize(
    ("sql", "placeholders", "body"),
    [
        ("UPDATE t SET a = 1", 0, "UPDATE t SET a = 1"),
        ("UPDATE t SET a = 1;", 0, "UPDATE t SET a = 1"),
        ("UPDATE t SET a = 1 ;  -- done", 0, "UPDATE t SET a = 1 "),
        ("UPDATE t SET a = 1 -- no ';' here", 0, "UPDATE t SET a = 1 -- no ';' here"),
        ("SELECT ';' FROM t; # x", 0, "SELECT ';' FROM t"),
        ("UPDATE t SET a = %s; /* 100%% */", 1, None),  # pymysql would format the comment too
    ],
)
def test_body_is_the_statement_without_its_terminator(
    sql: str, placeholders: int, body: str | None
) -> None:
    """What a batch sends: the statement up to its terminating ';' (comments after it are cut,
    and one before it is ended by the batch's line break)."""
    assert check_statement(sql, placeholders=placeholders).body == body


def test_the_coordinator_protects_the_agents_default_marker_table() -> None:
    """The coordinator cannot read the agents' configuration: it protects their default."""
    assert AgentConfig().marker_table == DEFAULT_MARKER_TABLE


@pytest.mark.parametrize(
    ("sql", "leaves_state"),
    [
        # Reads that call nothing, or only built-ins without session effects: no reset.
        ("SELECT balance FROM accounts WHERE id = 1", False),
        ("SELECT COUNT(*), SUM(a), COALESCE(MAX(b), 0) FROM t WHERE c IN (1, 2)", False),
        ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.a = t.a) FOR UPDATE", False),
        ("SELECT CAST(a AS DECIMAL(10, 2)), NOW(), CONCAT(b, 'x') FROM t", False),
        ("SELECT * FROM t JOIN u USING (id) WHERE t.d > DATE_SUB(NOW(), INTERVAL 1 DAY)", False),
        ("SELECT 'f(x)', `g` FROM t -- h(y)", False),
        ("SELECT SLEEP(0)", False),
        ("UPDATE accounts SET balance = balance + 1 WHERE id = 1", False),
        ("DELETE FROM t WHERE id = 1 AND d < NOW()", False),
        ("WITH x AS (SELECT 1) DELETE FROM t", False),
        ("UPDATE t SET inserted = 1, replaced = 2", False),
        # An INSERT or REPLACE sets LAST_INSERT_ID.
        ("INSERT INTO t (a) VALUES (1)", True),
        ("insert t values (1)", True),
        ("REPLACE INTO t VALUES (1)", True),
        ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", True),
        ("UPDATE t SET a = my_func(a)", True),
        # Reads that call what the guard does not know: a stored function may do anything.
        ("SELECT my_func(1)", True),
        ("SELECT shop.count(1)", True),  # qualified: a stored function, whatever its name
        ("SELECT `count`(1)", True),
        ("SELECT LAST_INSERT_ID(5)", True),
        ("SELECT NEXTVAL(s)", True),
        ("SELECT NEXT VALUE FOR s", True),
        ("SELECT PREVIOUS VALUE FOR s", True),
        ("SELECT a FROM t WHERE b = f (1)", True),
        ("SELECT a FROM t WHERE b = f/**/(1)", True),
    ],
)
def test_statements_that_may_leave_session_state(sql: str, leaves_state: bool) -> None:
    """What makes the agent reset the session before it returns to the pool."""
    assert check(sql).session_state is leaves_state
