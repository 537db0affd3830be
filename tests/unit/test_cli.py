"""The ``twopc`` command's pure parts: where ``twopc tx`` finds the coordinator."""

from __future__ import annotations

import json
from pathlib import Path

from twopc.cli import PLAYGROUND_STATE_FILE, coordinator_address
from twopc.testing.playground.cluster import STATE_FILE


def playground_state(directory: Path, text: str) -> None:
    (directory / ".twopc-playground").mkdir()
    (directory / ".twopc-playground" / "state.json").write_text(text)


def test_the_option_then_the_environment_then_the_playground_then_the_default(
    tmp_path: Path,
) -> None:
    env = {"TWOPC_COORDINATOR": "10.0.0.2:7100"}
    assert coordinator_address(None, {}, tmp_path)[0] == "127.0.0.1:7100"
    playground_state(tmp_path, json.dumps({"client_address": "127.0.0.1:41234"}))
    assert coordinator_address(None, {}, tmp_path) == (
        "127.0.0.1:41234",
        "the playground's .twopc-playground/state.json",
    )
    assert coordinator_address(None, env, tmp_path) == ("10.0.0.2:7100", "$TWOPC_COORDINATOR")
    assert coordinator_address("10.0.0.3:1", env, tmp_path) == ("10.0.0.3:1", "--coordinator")


def test_an_unreadable_state_file_is_passed_over(tmp_path: Path) -> None:
    playground_state(tmp_path, "{not json")
    assert coordinator_address(None, {}, tmp_path)[0] == "127.0.0.1:7100"


def test_the_state_file_name_is_the_playgrounds() -> None:
    assert PLAYGROUND_STATE_FILE == STATE_FILE
