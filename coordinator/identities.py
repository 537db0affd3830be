"""Which identity may use which participants: the coordinator's ``identities`` setting.

``identities`` maps an identity (the Common Name of a client certificate, ``twopc.identity``) to
the participants it may use, ``"*"`` standing for all of them::

    [identities]
    shop = ["eu", "us"]
    reports = ["*"]

An identity that is not listed may not use the client API at all; a listed one that names a
participant it may not use (Execute, RunTransaction) is refused before anything starts. Both get
PERMISSION_DENIED naming the identity and the setting. Without the setting (the default) every
identity the CA vouches for may use every participant. Without an identity (a coordinator run
with ``insecure_plaintext``) no rule applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from twopc.errors import InvalidArgument, PermissionDenied

__all__ = ["ALL", "OPEN", "IdentityRules"]

ALL = "*"


@dataclass(frozen=True)
class IdentityRules:
    """The ``identities`` setting, checked.

    Attributes:
        allowed: identity -> the participants it may use (None: all of them); None when the
            setting is absent (every identity may use every participant).
        component: how the coordinator names itself in a refusal.
    """

    allowed: Mapping[str, frozenset[str] | None] | None
    component: str = "the coordinator"

    @classmethod
    def from_setting(
        cls,
        identities: Mapping[str, Iterable[str]] | None,
        participants: Iterable[str],
        *,
        component: str = "the coordinator",
    ) -> IdentityRules:
        """Raises InvalidArgument for a participant that the coordinator does not know, or a
        "*" beside participant names."""
        if identities is None:
            return cls(None, component)
        known = set(participants)
        allowed: dict[str, frozenset[str] | None] = {}
        for identity, listed in identities.items():
            names = tuple(listed)
            if ALL in names:
                if len(names) != 1:
                    raise InvalidArgument(
                        f'identities.{identity}: "*" (every participant) stands alone'
                    )
                allowed[identity] = None
                continue
            unknown = sorted(set(names) - known)
            if unknown:
                raise InvalidArgument(
                    f"identities.{identity} names participant(s) {', '.join(unknown)}, which "
                    f"are not in participants ({', '.join(sorted(known)) or 'none'})"
                )
            allowed[identity] = frozenset(names)
        return cls(MappingProxyType(allowed), component)

    @property
    def open(self) -> bool:
        """Whether every identity may use every participant (the setting is absent)."""
        return self.allowed is None

    def admit(self, identity: str | None) -> None:
        """PermissionDenied when ``identity`` may not use the client API at all."""
        if identity is None or self.allowed is None or identity in self.allowed:
            return
        raise PermissionDenied(
            f"identity {identity!r} may not use the client API of {self.component}: it is not "
            f"listed in the coordinator's identities setting; add it there, with the "
            f"participants it may use (identities.{identity} = [...]), if it should"
        )

    def check_participants(self, identity: str | None, participants: Iterable[str]) -> None:
        """PermissionDenied naming the first of ``participants`` that ``identity`` may not use
        (nothing was started: the check comes first)."""
        self.admit(identity)
        if identity is None or self.allowed is None:
            return
        allowed = self.allowed[identity]
        if allowed is None:
            return
        for participant in participants:
            if participant not in allowed:
                shown = ", ".join(sorted(allowed)) or "none"
                raise PermissionDenied(
                    f"identity {identity!r} may not use participant {participant!r} on "
                    f"{self.component}: the coordinator's identities setting allows it "
                    f"{shown} (nothing was started)"
                )


#: No identities setting: every identity may use every participant.
OPEN = IdentityRules(None)
