"""Failpoints: named places in the daemons where a test can make a process crash or stall.

Armed at start from ``TWOPC_FAILPOINTS``: ``name=action[;name=action...]`` with actions
``crash`` (the process SIGKILLs itself: no cleanup, no flush), ``sleep(ms)`` and ``pause`` (blocks
until the process is killed). A failpoint that is not armed costs one dict lookup on an empty dict.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Mapping

ENV_VAR = "TWOPC_FAILPOINTS"
_ACTION = re.compile(r"crash|pause|sleep\((\d+)\)")


class Failpoints:
    def __init__(self, actions: Mapping[str, str] | None = None) -> None:
        self._actions = dict(actions or {})
        for name, action in self._actions.items():
            if not _ACTION.fullmatch(action):
                raise ValueError(f"failpoint {name}: unknown action {action!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Failpoints:
        spec = environ.get(ENV_VAR, "").strip()
        actions = {}
        for item in filter(None, (part.strip() for part in spec.split(";"))):
            name, _, action = item.partition("=")
            actions[name.strip()] = action.strip() or "crash"
        return cls(actions)

    def hit(self, name: str) -> None:
        """Runs the action armed at ``name``, if any. Blocking: call it off the event loop only for
        actions that sleep or pause, or accept that the loop stalls (which is what a test wants)."""
        action = self._actions.get(name)
        if action is None:
            return
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "pause":
            threading.Event().wait()
        else:
            match = _ACTION.fullmatch(action)
            assert match is not None
            time.sleep(int(match.group(1)) / 1000)
