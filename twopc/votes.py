"""The words both ends of the protocol use about one branch: the participant's vote at prepare,
and what a participant can tell of a branch when asked (Inspect). The coordinator's engine and
the agent share these, and the wire API carries them as its own enums."""

from __future__ import annotations

import enum


class Vote(enum.Enum):
    PREPARED = "prepared"
    READ_ONLY = "read-only"
    ABORT = "abort"
    ALREADY_COMMITTED = "already committed"  # an earlier attempt of this txid committed here


class Presence(enum.Enum):
    """What a participant can tell of a branch."""

    UNKNOWN = "unknown"
    ACTIVE = "active"
    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"
