"""The statement guard: refuses client SQL that would break the XA branch it is meant to run in.

The agent runs each client statement inside an XA branch it owns. A statement that ends the branch
(XA, COMMIT, DDL, LOCK TABLES), changes the session under it (SET autocommit, which MariaDB accepts
silently inside a branch), runs code the agent cannot see (CALL, executable comments), writes files
on the server (INTO OUTFILE) or touches the agent's own marker table is refused here, before it
reaches the server, with an ``InvalidArgument`` that says what was refused and why.

Both daemons run it. The coordinator checks every statement of a request before it starts
anything (no transaction begun, no agent called), so that a refused statement gets the same
answer whatever path it came by; the agent checks again, because a caller can reach an agent
directly, and only the agent knows the name of its marker table for sure (the coordinator
protects the default name, ``DEFAULT_MARKER_TABLE``).

Nor may a statement leave state on the agent's pooled session, where it would outlive the
transaction and meet the next one, whoever sends it: user variables (``@name``, ``SELECT ...
INTO @name``, ``@name := ...``) and user-level locks (``GET_LOCK``, ``RELEASE_LOCK``,
``RELEASE_ALL_LOCKS``, ``IS_FREE_LOCK``, ``IS_USED_LOCK``, which neither commit nor rollback
releases) are refused, and so is ``LOAD_FILE``, which reads files on the database server.
``SLEEP`` and ``BENCHMARK`` are allowed: they hold a session no longer than a slow query does,
and the branch's deadline interrupts either. What the guard cannot refuse is flagged instead
(``CheckedStatement.session_state``): a call of a stored function (which may set a variable or
take a lock), a sequence's next or previous value, an INSERT or REPLACE (``LAST_INSERT_ID``); the
agent resets a session that ran such a statement before it returns to the pool. A plain SELECT,
UPDATE or DELETE costs no reset: the agent trusts triggers on UPDATE and DELETE to leave no
session state, unless its ``reset_sessions`` setting says ``always``.

The guard is an allow-list on the statement's first keyword (READ: SELECT, WITH, VALUES, TABLE;
WRITE: INSERT, UPDATE, DELETE, REPLACE, and a WITH whose main statement writes) on top of a lexer
that splits the SQL the way the MySQL/MariaDB lexer does: quoted strings with backslash escapes and
doubled quotes, backtick identifiers with doubled backticks only, ``-- `` comments (the second dash
must be followed by whitespace, a control character or the end), ``#`` comments and ``/* */``
comments, which do not nest. ``/*! */`` and ``/*M! */`` are refused: the server runs their contents.

Assumptions the agent must keep true on its connections:
- ``sql_mode`` contains neither ``NO_BACKSLASH_ESCAPES`` nor ``ANSI_QUOTES`` (under either, quotes
  end elsewhere than this lexer thinks). Clients cannot change it: SET is refused.
- The character set is utf8mb4 (no multi-byte character hides a backslash or a quote).
- pymysql gets ``args=None`` when a statement has no parameters, so that it does not ``%``-format
  the statement then; with parameters it formats the whole text, string literals and comments
  included, which is why every ``%`` must then be ``%%`` or a ``%s`` placeholder outside literals.
- Multi-statements stay off in the driver (pymysql's default), as a second line of defence.

Cost: one regex pass over the text in which runs of ordinary code are matched whole, so that the
Python loop only sees literals, comments, ``%`` and ``;``; then a few C-level regex searches over
the literal-free skeleton. O(n), and no backtracking (possessive quantifiers). Measured with
CPython 3.11 on the 2-core development machine, best of 7 x 200k calls: 5.4 us (5.1 to 7 us under
load) for a typical 101-character UPDATE with two placeholders, a string literal and one protected
table; 2.7 us for ``SELECT 1``; 9 us for a WITH ... UPDATE (the CTE list is parsed); 300 us for a
5.5 kB SELECT with 400 placeholders (about 0.4 us per literal, placeholder or comment). The
session-state checks add 0.2 to 0.3 us, and about 4 us to a read that calls functions (each
call's name is looked up: 8.2 us for ``SELECT COUNT(*), SUM(a) FROM t WHERE id IN (%s, %s)``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass

from twopc.errors import InvalidArgument

__all__ = ["DEFAULT_MARKER_TABLE", "CheckedStatement", "StatementKind", "check_statement"]

# The agent's bookkeeping table unless its configuration names another (``marker_table``).
DEFAULT_MARKER_TABLE = "twopc_branch_marker"


class StatementKind(enum.Enum):
    """What a statement does to the branch: a branch that only read votes READ_ONLY at prepare."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class CheckedStatement:
    """A statement the guard accepted.

    Attributes:
        kind: whether it reads only or may write.
        sql: the SQL exactly as given (a trailing ``;`` and comments included).
        body: the SQL without its terminating ``;`` and what follows it, to be sent with other
            statements (it may still end in a comment); None when what follows holds a ``%``,
            which pymysql's formatting would see.
        session_state: whether running it may leave state on its session beyond the end of the
            transaction: it calls a function that is not a built-in known to leave none (a
            stored function may set user variables or take user-level locks), names a
            sequence's next or previous value (kept per session), or inserts (an INSERT or
            REPLACE sets ``LAST_INSERT_ID``). False for a SELECT, UPDATE or DELETE that calls
            only such built-ins.
    """

    kind: StatementKind
    sql: str
    body: str | None
    session_state: bool = True


# Characters of an unquoted identifier or keyword: MySQL's ASCII identifier characters plus every
# character of the Basic Multilingual Plane beyond ASCII (any multi-byte utf8 character counts as
# an identifier character in the lexer). Characters outside the BMP end a word here, so that a
# protected name glued to one is still seen.
_WORD_CHARS = "0-9A-Za-z_$\u0080-\uffff"
_WHITESPACE = " \t\n\r\f\v"  # what MySQL skips between tokens (ASCII only, like my_isspace)

# The lexer. Each alternative starts with a different character class, and every repetition is
# possessive, so it never backtracks. ``code`` takes whole runs of ordinary text (words,
# whitespace, operators) at once; only the constructs that matter come out as separate matches.
_LEX = re.compile(
    r"""
      (?P<code> (?: [^'"`\#/\-;%]++ | /(?!\*) | -(?!-(?:[\x00-\x20\x7f]|\Z)) )++ )
    | (?P<string> '(?:[^'\\]++|\\.|'')*+' | "(?:[^"\\]++|\\.|"")*+" )
    | (?P<ident> `(?:[^`]++|``)*+` )
    | (?P<percent> %[%s]? )
    | (?P<semicolon> ; )
    | (?P<executable> /\*[Mm]?! )
    | (?P<comment> /\*(?:[^*]++|\*(?!/))*+\*/ | \#[^\n]*+ | --[^\n]*+ )
    | (?P<unterminated> . )
    """,
    re.VERBOSE | re.DOTALL,
)
_PERCENT = re.compile(r"%[%s]?")
_FIRST_WORD = re.compile(rf"[\s(]*+([{_WORD_CHARS}]++)?", re.ASCII)
_WORD = re.compile(rf"[{_WORD_CHARS}]++", re.ASCII)
_TOKEN = re.compile(rf"[{_WORD_CHARS}]++|''|``|%[%s]?|\S", re.ASCII)
_USER_LOCK = re.compile(
    rf"(?<![{_WORD_CHARS}])(GET_LOCK|RELEASE_LOCK|RELEASE_ALL_LOCKS|IS_FREE_LOCK|IS_USED_LOCK"
    rf"|LOAD_FILE)\s*+\(",
    re.ASCII | re.IGNORECASE,
)
_USER_VARIABLE = re.compile(r"@@|@")
# A call: a word, a quoted name (``) or a qualified name, then '('. Comments are spaces by now.
_CALL = re.compile(rf"(\.\s*+)?([{_WORD_CHARS}]++|``)\s*+\(", re.ASCII)
_SEQUENCE_VALUE = re.compile(r"(?<![\w$])(?:NEXT|PREVIOUS)\s++VALUE\s++FOR(?![\w$])", re.I)
_INSERTS = re.compile(r"(?<![\w$])(?:INSERT|REPLACE)(?![\w$])", re.I)
_INTO_FILE = re.compile(
    rf"(?<![{_WORD_CHARS}])INTO\s++(OUTFILE|DUMPFILE)(?![{_WORD_CHARS}])\s*+(.?)",
    re.ASCII | re.IGNORECASE | re.DOTALL,
)

_KINDS = {
    "SELECT": StatementKind.READ,
    "VALUES": StatementKind.READ,
    "TABLE": StatementKind.READ,
    "INSERT": StatementKind.WRITE,
    "UPDATE": StatementKind.WRITE,
    "DELETE": StatementKind.WRITE,
    "REPLACE": StatementKind.WRITE,
}
_ALLOWED = "only SELECT, WITH, VALUES, TABLE, INSERT, UPDATE, DELETE and REPLACE are"

_TRANSACTION_CONTROL = (
    "transaction control ({kw}) is not allowed inside a twopc transaction: the coordinator "
    "commits or rolls back every branch; commit or roll back the twopc transaction instead"
)
_DDL = (
    "{kw} (DDL) is not allowed inside a twopc transaction: DDL commits implicitly and cannot be "
    "part of an XA branch; run schema changes outside twopc"
)
_LOCK = (
    "{kw} TABLES is not allowed inside a twopc transaction: it commits the branch implicitly; "
    "lock rows with SELECT ... FOR UPDATE instead"
)
_REFUSED = {
    "XA": "XA statements are not allowed inside a twopc transaction: the agent manages the branch",
    "COMMIT": _TRANSACTION_CONTROL,
    "ROLLBACK": _TRANSACTION_CONTROL,
    "BEGIN": _TRANSACTION_CONTROL,
    "START": _TRANSACTION_CONTROL,
    "SAVEPOINT": _TRANSACTION_CONTROL,
    "RELEASE": _TRANSACTION_CONTROL,
    "SET": (
        "SET is not allowed inside a twopc transaction: the session belongs to the agent (a SET "
        "can change autocommit, the isolation level or the character set under the branch); "
        "put values in the statement itself"
    ),
    "CREATE": _DDL,
    "ALTER": _DDL,
    "DROP": _DDL,
    "TRUNCATE": _DDL,
    "RENAME": _DDL,
    "LOCK": _LOCK,
    "UNLOCK": _LOCK,
    "CALL": (
        "CALL is not allowed inside a twopc transaction: a stored procedure may commit, roll "
        "back or change session state behind the agent; send its statements one by one"
    ),
    "LOAD": (
        "LOAD statements are not allowed inside a twopc transaction: they read files on the "
        "server or the agent's host; send the rows as INSERT statements"
    ),
    "HANDLER": (
        "HANDLER is not allowed inside a twopc transaction: it reads outside the transaction's "
        "isolation and keeps tables open across requests; use SELECT"
    ),
    "DO": (
        "DO is not allowed inside a twopc transaction: it evaluates expressions only for their "
        "side effects (locks, sleeps); use SELECT"
    ),
}
_SESSION_LOCK = (
    "{name} is not allowed inside a twopc transaction: a user-level lock is not released when "
    "the transaction ends, so it would outlive it on the agent's pooled session; lock rows with "
    "SELECT ... FOR UPDATE instead"
)
_SESSION_STATE_REFUSED = {
    "LOAD_FILE": (
        "LOAD_FILE is not allowed inside a twopc transaction: it reads a file on the database "
        "server; send the contents as a parameter"
    ),
}
_USER_VARIABLES = (
    "user variables (@name) are not allowed inside a twopc transaction: they outlive the "
    "transaction on the agent's pooled session, where the next transaction could read them; "
    "pass values as parameters and read results from the rows returned"
)
# Words that may stand before '(' without a call of anything that can leave session state:
# keywords, and built-in functions without session side effects. Unqualified, a built-in's
# name always calls the built-in (a stored function of the same name needs its schema).
# Missing a word here costs a session reset, never safety.
_NO_SESSION_EFFECTS_WORDS = """
    SELECT FROM WHERE AND OR NOT XOR IN EXISTS AS ON USING JOIN STRAIGHT_JOIN VALUES VALUE WHEN
    THEN ELSE CASE ANY SOME ALL UNION INTERSECT EXCEPT OVER BY HAVING LIMIT OFFSET IS LIKE
    BETWEEN DISTINCT WITH RECURSIVE LATERAL ROW ROWS RANGE INDEX KEY FOR AGAINST MATCH
    INTERVAL BINARY ESCAPE TABLE DUAL INNER OUTER CROSS NATURAL PARTITION WINDOW
    COUNT SUM MIN MAX AVG GROUP_CONCAT STD STDDEV STDDEV_POP STDDEV_SAMP VARIANCE VAR_POP
    VAR_SAMP BIT_AND BIT_OR BIT_XOR COALESCE IFNULL NULLIF IF GREATEST LEAST ABS ROUND
    TRUNCATE FLOOR CEIL CEILING MOD POW POWER SQRT EXP LN LOG LOG2 LOG10 SIGN PI CONCAT
    CONCAT_WS LOWER UPPER LCASE UCASE LENGTH CHAR_LENGTH CHARACTER_LENGTH OCTET_LENGTH
    SUBSTRING SUBSTR SUBSTRING_INDEX MID LEFT RIGHT TRIM LTRIM RTRIM LPAD RPAD REPLACE REVERSE
    REPEAT SPACE LOCATE INSTR POSITION FIELD ELT FIND_IN_SET STRCMP HEX UNHEX FORMAT CAST
    CONVERT DATE TIME TIMESTAMP YEAR MONTH DAY HOUR MINUTE SECOND MICROSECOND QUARTER WEEK
    DAYOFWEEK DAYOFMONTH DAYOFYEAR WEEKDAY YEARWEEK DAYNAME MONTHNAME DATE_ADD DATE_SUB
    ADDDATE SUBDATE ADDTIME SUBTIME DATEDIFF TIMEDIFF TIMESTAMPDIFF TIMESTAMPADD DATE_FORMAT
    TIME_FORMAT STR_TO_DATE EXTRACT NOW CURDATE CURTIME CURRENT_DATE CURRENT_TIME
    CURRENT_TIMESTAMP LOCALTIME LOCALTIMESTAMP SYSDATE UTC_DATE UTC_TIME UTC_TIMESTAMP
    UNIX_TIMESTAMP FROM_UNIXTIME FROM_DAYS TO_DAYS TO_SECONDS SEC_TO_TIME TIME_TO_SEC
    LAST_DAY MAKEDATE MAKETIME DECIMAL NUMERIC CHAR VARCHAR NCHAR SIGNED UNSIGNED INTEGER INT
    DOUBLE FLOAT REAL DATETIME JSON_EXTRACT JSON_UNQUOTE JSON_QUOTE JSON_VALUE JSON_QUERY
    JSON_OBJECT JSON_ARRAY JSON_ARRAYAGG JSON_OBJECTAGG JSON_CONTAINS JSON_CONTAINS_PATH
    JSON_LENGTH JSON_KEYS JSON_TYPE JSON_VALID ROW_NUMBER RANK DENSE_RANK PERCENT_RANK
    CUME_DIST NTILE LAG LEAD FIRST_VALUE LAST_VALUE NTH_VALUE MD5 SHA1 SHA SHA2 CRC32 UUID
    BIT_COUNT BIT_LENGTH ASCII ORD BIN OCT CONV INET_ATON INET_NTOA ISNULL SLEEP BENCHMARK
"""
_NO_SESSION_EFFECTS = frozenset(_NO_SESSION_EFFECTS_WORDS.split())
_SET_AUTOCOMMIT = (
    "SET autocommit is not allowed inside a twopc transaction: MariaDB accepts it silently inside "
    "an XA branch, and the branch's work would then commit outside two-phase commit"
)
_PERCENT_HINT = (
    "when parameters are given, pymysql formats the whole statement with %, so write a literal "
    "percent as '%%' or pass the value as a parameter"
)


def check_statement(
    sql: str, *, placeholders: int, protected_tables: Collection[str] = ()
) -> CheckedStatement:
    """Checks one client statement before it runs inside an XA branch.

    Args:
        sql: the statement, with pymysql ``%s`` placeholders.
        placeholders: how many parameters come with it.
        protected_tables: table names the client must never touch (compared case-insensitively
            with every identifier, bare or quoted, qualified or not).

    Returns:
        The statement and whether it reads only or may write.

    Raises:
        InvalidArgument: the statement is refused; the message says what and why.
    """
    if "\x00" in sql:
        # MySQL ends '#' and '-- ' comments at a NUL, so text after one is not what it seems.
        raise InvalidArgument(
            f"NUL character at offset {sql.index(chr(0))} is not allowed: send binary values as "
            "parameters"
        )
    names = {name.lower() for name in protected_tables}
    code, found, semicolon = _skeleton(sql, placeholders, names)
    kind = _kind(code)
    # Cheap substring tests before the word-level ones (sound: the words looked for are ASCII).
    lowered = code.lower()
    if "outfile" in lowered or "dumpfile" in lowered:
        _check_into_file(code)
    if "@" in code:
        _check_user_variables(code)
    if "lock" in lowered or "load_file" in lowered:
        _check_session_functions(code)
    if names:
        _check_protected(code, lowered, names)
    if found != placeholders:
        raise InvalidArgument(
            f"statement has {found} '%s' placeholder{'' if found == 1 else 's'} but "
            f"{placeholders} parameter{' was' if placeholders == 1 else 's were'} given"
        )
    return CheckedStatement(kind, sql, _body(sql, semicolon), _may_leave_state(code, lowered))


def _body(sql: str, semicolon: int) -> str | None:
    if semicolon < 0:
        return sql
    return None if "%" in sql[semicolon:] else sql[:semicolon]


def _skeleton(sql: str, placeholders: int, names: set[str]) -> tuple[str, int, int]:
    """Lexes ``sql`` once, refusing what is wrong at the lexical level.

    Returns:
        The code with every string literal emptied to two single quotes, every quoted
        identifier emptied to two backticks, comments turned into spaces, and the trailing ``;``
        and what follows it dropped; the number of ``%s`` placeholders outside literals; and the
        offset of the terminating ``;`` (-1 when there is none).
    """
    skeleton: list[str] = []
    found = 0
    semicolon = -1  # offset of the statement's terminating ';', once seen
    for match in _LEX.finditer(sql):
        group = match.lastgroup
        text = match.group()
        if group == "comment":
            _check_comment(text, match.start(), placeholders)
            skeleton.append(" ")
            continue
        if group in ("executable", "unterminated"):
            _refuse_lexically(group, text, match.start())
        if semicolon >= 0 and (group != "code" or text.strip(_WHITESPACE)):
            raise InvalidArgument(
                f"only one statement per request: found ';' at offset {semicolon}"
            )
        if group == "code":
            skeleton.append(text)
        elif group == "string":
            if placeholders and "%" in text:
                _check_percents(text, match.start(), "a quoted string")
            if names and text[0] == '"' and text[1:-1].replace('""', '"').lower() in names:
                # Under ANSI_QUOTES this would be an identifier: refuse it either way.
                _refuse_protected(text[1:-1])
            skeleton.append("''")
        elif group == "ident":
            if placeholders and "%" in text:
                _check_percents(text, match.start(), "a quoted identifier")
            if names and text[1:-1].replace("``", "`").lower() in names:
                _refuse_protected(text[1:-1])
            skeleton.append("``")
        elif group == "percent":
            if text == "%s":
                found += 1
            elif text == "%" and placeholders:
                raise InvalidArgument(f"lone '%' at offset {match.start()}: {_PERCENT_HINT}")
            skeleton.append(text)
        else:  # semicolon
            semicolon = match.start()
    return "".join(skeleton), found, semicolon


def _check_comment(text: str, offset: int, placeholders: int) -> None:
    if text.startswith("/*+") and any(quote in text for quote in "'\"`"):
        # MySQL 8 reads optimizer hints with a scanner of their own, in which a quoted name may
        # contain '*/': where such a hint ends cannot be told here.
        raise InvalidArgument(
            f"optimizer hint at offset {offset} contains a quote: write the hint without quoted "
            "names"
        )
    if placeholders and "%" in text:
        _check_percents(text, offset, "a comment")


def _refuse_lexically(group: str, text: str, offset: int) -> None:
    if group == "executable":
        raise InvalidArgument(
            f"executable comment {text!r} at offset {offset} is not allowed: MySQL and MariaDB "
            "run its contents as SQL; write the SQL without the comment"
        )
    what = {"'": "quoted string", '"': "quoted string", "`": "quoted identifier"}
    raise InvalidArgument(
        f"unterminated {what.get(text, '/* comment')} starting at offset {offset}"
    )


def _kind(code: str) -> StatementKind:
    """The kind of the statement whose literal-free skeleton is ``code``, or InvalidArgument."""
    first = _FIRST_WORD.match(code)
    word = first.group(1) if first else None
    if word is None:
        rest = code.strip(_WHITESPACE + "(")
        if not rest:
            raise InvalidArgument("empty statement: the SQL holds only whitespace or comments")
        raise InvalidArgument(
            f"statement must start with a keyword such as SELECT or INSERT, not {rest[:20]!r}"
        )
    if not (word.isascii() and word.isalpha()):
        raise InvalidArgument(
            f"statement must start with a keyword such as SELECT or INSERT, not {word[:20]!r}"
        )
    keyword = word.upper()
    if keyword == "WITH":
        return _with_kind(code, first.end() if first else 0)
    kind = _KINDS.get(keyword)
    if kind is not None:
        return kind
    if keyword == "SET" and any(w.lower() == "autocommit" for w in _WORD.findall(code)):
        raise InvalidArgument(_SET_AUTOCOMMIT)
    reason = _REFUSED.get(keyword)
    if reason is not None:
        raise InvalidArgument(reason.format(kw=keyword))
    raise InvalidArgument(
        f"{keyword} statements are not allowed inside a twopc transaction: {_ALLOWED}"
    )


def _with_kind(code: str, after_with: int) -> StatementKind:
    """The kind of ``WITH [RECURSIVE] name [(cols)] AS (...) [CYCLE ... RESTRICT], ... <main>``."""
    tokens = _TOKEN.findall(code, after_with)
    tokens.append("")  # sentinel: reading past the end gives ""
    i = 1 if tokens[0].upper() == "RECURSIVE" else 0
    while True:
        if not (tokens[i] == "``" or _WORD.fullmatch(tokens[i])):
            break
        i += 1
        if tokens[i] == "(":
            i = _after_parens(tokens, i)
        if tokens[i].upper() != "AS" or tokens[i + 1] != "(":
            break
        i = _after_parens(tokens, i + 1)
        if tokens[i].upper() == "CYCLE":  # MariaDB: CYCLE col, ... RESTRICT
            while tokens[i] and tokens[i].upper() != "RESTRICT":
                i += 1
            if not tokens[i]:
                break
            i += 1
        if tokens[i] != ",":
            while tokens[i] == "(":
                i += 1
            main = tokens[i].upper()
            if main in ("SELECT", "VALUES", "TABLE"):
                return StatementKind.READ
            if main in ("INSERT", "UPDATE", "DELETE", "REPLACE"):
                return StatementKind.WRITE
            break
        i += 1
    raise InvalidArgument(
        "could not find the SELECT, INSERT, UPDATE or DELETE after the WITH clause: write "
        "WITH name AS (...) [, name AS (...)] followed by the statement"
    )


def _after_parens(tokens: list[str], i: int) -> int:
    """The index after the parenthesis opened at ``tokens[i]`` closes (at the sentinel if never)."""
    depth = 0
    while tokens[i]:
        if tokens[i] == "(":
            depth += 1
        elif tokens[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _check_into_file(code: str) -> None:
    """Refuses SELECT ... INTO OUTFILE / DUMPFILE, which write files on the database server."""
    for match in _INTO_FILE.finditer(code):
        target, after = match.group(1).upper(), match.group(2)
        # DUMPFILE is not a reserved word: INSERT INTO dumpfile ... names a table. The file
        # form needs a string (or a %s that pymysql turns into one) next.
        table_follows = after != "" and (after in "`(." or _WORD.match(after) is not None)
        if target == "OUTFILE" or not table_follows:
            raise InvalidArgument(
                f"SELECT ... INTO {target} is not allowed: it writes a file on the database "
                "server; fetch the rows instead"
            )


def _check_user_variables(code: str) -> None:
    """Refuses ``@name`` (in any of its forms: ``@'name'``, ``@`name```, ``INTO @name``,
    ``@name := ...``); ``@@name``, a system variable, may be read."""
    for match in _USER_VARIABLE.finditer(code):
        if match.group() == "@":
            raise InvalidArgument(_USER_VARIABLES)


def _check_session_functions(code: str) -> None:
    """Refuses the user-level lock functions and LOAD_FILE (space or a comment before the '('
    included: MySQL takes ``GET_LOCK (...)`` as the call)."""
    match = _USER_LOCK.search(code)
    if match is not None:
        name = match.group(1).upper()
        raise InvalidArgument(_SESSION_STATE_REFUSED.get(name) or _SESSION_LOCK.format(name=name))


def _may_leave_state(code: str, lowered: str) -> bool:
    """See ``CheckedStatement.session_state``; a false yes costs a reset, a false no a leak."""
    if ("insert" in lowered or "replace" in lowered) and _INSERTS.search(code):
        return True
    if "value" in lowered and _SEQUENCE_VALUE.search(code):
        return True
    if "(" not in code:
        return False
    for match in _CALL.finditer(code):
        qualified, name = match.groups()
        if qualified or name == "``" or name.upper() not in _NO_SESSION_EFFECTS:
            return True
    return False


def _check_protected(code: str, lowered: str, names: set[str]) -> None:
    """Refuses any bare identifier in ``code`` that is one of the protected table names."""
    # A bare word equal to an ASCII name leaves that name in the lowered text.
    if not any(not name.isascii() or name in lowered for name in names):
        return
    for word in _WORD.findall(code):
        if word.lower() in names:
            _refuse_protected(word)


def _refuse_protected(name: str) -> None:
    raise InvalidArgument(
        f"statement refers to {name!r}, a table the twopc agent keeps for its own bookkeeping: "
        "clients may not read or write it"
    )


def _check_percents(text: str, offset: int, where: str) -> None:
    """With parameters, a '%' inside a literal or comment must be '%%' (pymysql formats it too)."""
    for match in _PERCENT.finditer(text):
        if match.group() == "%%":
            continue
        at = offset + match.start()
        if match.group() == "%s":
            raise InvalidArgument(
                f"'%s' inside {where} at offset {at} would be replaced by a parameter: "
                + _PERCENT_HINT
            )
        raise InvalidArgument(f"lone '%' inside {where} at offset {at}: {_PERCENT_HINT}")
