"""Logs never carry row data: the database's message text is cut from logged reasons."""

from __future__ import annotations

from twopc.logs import redact


def test_database_message_is_cut_and_the_error_number_kept() -> None:
    reason = (
        "participant us voted no: statement 1 failed: (1062) Duplicate entry "
        "'alice@example.com' for key 'PRIMARY' on participant us; the transaction is rolled back"
    )
    logged = redact(reason)
    assert "alice" not in logged
    assert "(1062) [database message not logged]" in logged
    assert logged.endswith("; the transaction is rolled back")


def test_reasons_without_a_database_message_are_unchanged() -> None:
    assert redact("the transaction's deadline passed") == "the transaction's deadline passed"
