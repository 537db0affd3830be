"""The judge of the agent's database user: SHOW GRANTS lines as MariaDB 10.11 prints them (copied
from a server), each right beyond the agent's needs found, with the REVOKE that takes it away."""

from __future__ import annotations

import pytest

from participants.config import AgentConfig
from participants.grants import (
    GrantLevel,
    UnreadableGrant,
    grant_findings,
    least_grants,
    parse_grant,
    reach_findings,
)

USER = "`twopc_agent`@`%`"
PASSWORD = " IDENTIFIED BY PASSWORD '*D821809F681A40A6E379B50D0463EFAE20BDD122'"
LEAST = [
    f"GRANT USAGE ON *.* TO {USER}{PASSWORD}",
    f"GRANT SELECT, INSERT, UPDATE, DELETE ON `shop`.* TO {USER}",
    f"GRANT CREATE ON `shop`.`twopc_branch_marker` TO {USER}",
]


def findings(*lines: str, schemas: tuple[str, ...] = ("shop",)) -> list[str]:
    return [
        str(f)
        for f in grant_findings(
            [*LEAST, *lines], schemas=schemas, database="shop", marker_table="twopc_branch_marker"
        )
    ]


def test_the_least_grants_pass_and_are_what_least_grants_writes() -> None:
    assert findings() == []
    assert least_grants(USER, ["shop"], "shop", "twopc_branch_marker") == [
        line.removesuffix(PASSWORD) for line in LEAST[1:]
    ]


@pytest.mark.parametrize(
    ("line", "named", "fix"),
    [
        (f"GRANT FILE ON *.* TO {USER}", "FILE on *.*", f"REVOKE FILE ON *.* FROM {USER}"),
        (f"GRANT SUPER ON *.* TO {USER}", "SUPER on *.*", f"REVOKE SUPER ON *.* FROM {USER}"),
        (
            f"GRANT PROCESS, CONNECTION ADMIN ON *.* TO {USER}",
            "CONNECTION ADMIN on *.*",
            f"REVOKE CONNECTION ADMIN ON *.* FROM {USER}",
        ),
        (
            f"GRANT ALL PRIVILEGES ON *.* TO {USER} WITH GRANT OPTION",
            "ALL PRIVILEGES on *.*",
            f"REVOKE ALL PRIVILEGES ON *.* FROM {USER}",
        ),
        (f"GRANT SELECT ON *.* TO {USER}", "SELECT on *.*", f"REVOKE SELECT ON *.* FROM {USER}"),
        (
            f"GRANT SELECT ON `mysql`.* TO {USER}",
            "SELECT on `mysql`.*: the server's own tables",
            f"REVOKE SELECT ON `mysql`.* FROM {USER}",
        ),
        (
            f"GRANT INSERT ON `mysql`.`global_priv` TO {USER}",
            "INSERT on `mysql`.`global_priv`",
            f"REVOKE INSERT ON `mysql`.`global_priv` FROM {USER}",
        ),
        (
            f"GRANT SELECT ON `billing`.* TO {USER}",
            "SELECT on `billing`.*: a schema beyond those statements may touch (shop)",
            f"REVOKE SELECT ON `billing`.* FROM {USER}",
        ),
        (
            f"GRANT SELECT (`id`) ON `billing`.`invoices` TO {USER}",
            "SELECT (`id`) on `billing`.`invoices`",
            f"REVOKE SELECT (`id`) ON `billing`.`invoices` FROM {USER}",
        ),
        (
            f"GRANT SELECT ON `sho_`.* TO {USER}",
            "a pattern",
            f"REVOKE SELECT ON `sho_`.* FROM {USER}",
        ),
        (
            f"GRANT CREATE, DROP, ALTER ON `shop`.* TO {USER}",
            "CREATE, DROP, ALTER on `shop`.*: not needed",
            f"REVOKE CREATE, DROP, ALTER ON `shop`.* FROM {USER}",
        ),
        (
            f"GRANT ALL PRIVILEGES ON `shop`.* TO {USER}",
            "ALL PRIVILEGES on `shop`.*: not needed",
            f"REVOKE ALL PRIVILEGES ON `shop`.* FROM {USER}",
        ),
        (
            f"GRANT CREATE ON `shop`.`orders` TO {USER}",
            "CREATE on `shop`.`orders`: not needed",
            f"REVOKE CREATE ON `shop`.`orders` FROM {USER}",
        ),
        (
            f"GRANT SELECT ON `shop`.`orders` TO {USER} WITH GRANT OPTION",
            "the grant option on `shop`.`orders`",
            f"REVOKE GRANT OPTION ON `shop`.`orders` FROM {USER}",
        ),
        (f"GRANT `reporting` TO {USER}", "role `reporting`", f"REVOKE `reporting` FROM {USER}"),
        (
            f"GRANT PROXY ON ``@`%` TO {USER}",
            "PROXY on ``@`%`",
            f"REVOKE PROXY ON ``@`%` FROM {USER}",
        ),
        (
            "GRANT SELECT ON `billing`.`invoices` TO PUBLIC",
            "SELECT on `billing`.`invoices`",
            "REVOKE SELECT ON `billing`.`invoices` FROM PUBLIC",
        ),
        ("GRANT SELECT ON `billing`.* TO `reporting`", "`billing`.*", "FROM `reporting`"),
        (f"GRANT NONSENSE {USER}", "a grant the agent cannot read", "check it by hand"),
    ],
)
def test_each_right_beyond_the_needs_is_found_with_its_revoke(
    line: str, named: str, fix: str
) -> None:
    found = findings(line)
    assert found, f"nothing found in {line!r}"
    assert any(named in f and fix in f for f in found), found


@pytest.mark.parametrize(
    "line",
    [
        f"GRANT EXECUTE ON FUNCTION `shop`.`price_of` TO {USER}",
        f"GRANT EXECUTE ON `shop`.* TO {USER}",
        f"GRANT SELECT (`id`), UPDATE (`qty`) ON `shop`.`stock` TO {USER}",
        f"GRANT SELECT ON `sho\\_p`.* TO {USER}",  # escaped: exactly `sho_p`, one of the schemas
        f"GRANT XA_RECOVER_ADMIN ON *.* TO {USER}",  # MySQL 8 needs it for XA RECOVER
        f"SET DEFAULT ROLE NONE FOR {USER}",
    ],
)
def test_what_the_agent_may_hold_passes(line: str) -> None:
    assert findings(line, schemas=("shop", "sho_p")) == []


def test_a_second_configured_schema_may_be_granted() -> None:
    line = f"GRANT SELECT, INSERT, UPDATE, DELETE ON `catalog`.* TO {USER}"
    assert findings(line, schemas=("shop", "catalog")) == []
    assert findings(line) != []


def test_the_parts_of_a_grant_line() -> None:
    grant = parse_grant(
        f"GRANT SELECT (`a``b`), DELETE HISTORY ON `my\\_db`.* TO {USER} WITH GRANT OPTION"
    )
    assert grant is not None
    assert grant.names == ("SELECT", "DELETE HISTORY")
    assert grant.privileges == ("SELECT (`a``b`)", "DELETE HISTORY")
    assert (grant.level, grant.schema, grant.pattern) == (GrantLevel.SCHEMA, "my_db", False)
    assert (grant.grantee, grant.grant_option) == (USER, True)
    routine = parse_grant(f"GRANT EXECUTE ON PROCEDURE `shop`.`restock` TO {USER}")
    assert routine is not None
    assert (routine.level, routine.schema, routine.table) == (
        GrantLevel.ROUTINE,
        "shop",
        "restock",
    )
    with pytest.raises(UnreadableGrant):
        parse_grant("REVOKE ALL ON *.* FROM x")


def test_schemas_the_server_shows_beyond_the_configured_ones_are_a_finding() -> None:
    assert reach_findings(["information_schema", "shop"], ["shop"]) == []
    (finding,) = reach_findings(["information_schema", "shop", "mysql", "billing"], ["shop"])
    assert "`billing`, `mysql`" in finding.what


def test_process_is_allowed_and_granted_only_for_lock_wait_reports() -> None:
    process = f"GRANT PROCESS ON *.* TO {USER}"
    assert [f for f in findings(process) if "PROCESS on *.*" in f]
    allowed = grant_findings(
        [*LEAST, process],
        schemas=("shop",),
        database="shop",
        marker_table="twopc_branch_marker",
        lock_waits=True,
    )
    assert allowed == []
    # Only PROCESS: anything else server-wide is still refused.
    more = grant_findings(
        [*LEAST, f"GRANT PROCESS, FILE ON *.* TO {USER}"],
        schemas=("shop",),
        database="shop",
        marker_table="twopc_branch_marker",
        lock_waits=True,
    )
    assert [str(f) for f in more] == [s for s in map(str, more) if "FILE on *.*" in s]
    assert len(more) == 1
    grants = least_grants(USER, ["shop"], "shop", "twopc_branch_marker", lock_waits=True)
    assert grants[-1] == f"GRANT PROCESS ON *.* TO {USER}"
    assert f"GRANT PROCESS ON *.* TO {USER}" not in least_grants(
        USER, ["shop"], "shop", "twopc_branch_marker"
    )


def test_the_agents_user_needs_process_only_when_it_reads_the_lock_waits_itself() -> None:
    assert not AgentConfig().process_for_lock_waits  # off by default
    assert AgentConfig(report_lock_waits=True).process_for_lock_waits
    reader = AgentConfig(report_lock_waits=True, lock_waits_user="twopc_lockwait")
    assert not reader.process_for_lock_waits
    assert reader.lock_waits_password({"TWOPC_LOCK_WAITS_PASSWORD": "s3"}) == "s3"
