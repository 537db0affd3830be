"""The branch registry's rules about the session a branch holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from participants.branches import Branch, BranchRegistry, BranchState
from twopc.txid import Xid


@dataclass
class FakeSession:
    calls: list[str] = field(default_factory=list)

    def release(self) -> None:
        self.calls.append("release")

    def discard(self) -> None:
        self.calls.append("discard")


def _branch(state: BranchState) -> tuple[Branch, FakeSession]:
    session = FakeSession()
    branch = Branch(xid=Xid("c1.r-a", "eu"), deadline=0.0, state=state)
    branch.session = session  # type: ignore[assignment]
    return branch, session


def test_a_prepared_branchs_session_is_never_released_to_the_pool() -> None:
    """The pool may reset what it gets back, which orphans a prepared branch on MariaDB."""
    branch, session = _branch(BranchState.PREPARED)
    with pytest.raises(AssertionError, match="is prepared"):
        branch.release_session()
    assert session.calls == []
    branch.discard_session()  # closing it detaches the branch: that is the way
    assert session.calls == ["discard"]


@pytest.mark.parametrize("state", [BranchState.ACTIVE, BranchState.COMMITTED])
def test_a_finished_or_unprepared_branch_gives_its_session_back(state: BranchState) -> None:
    branch, session = _branch(state)
    branch.release_session()
    assert session.calls == ["release"]
    assert branch.session is None


def test_finishing_a_branch_releases_its_session() -> None:
    registry = BranchRegistry(capacity=2, finished_memory=2)
    created = registry.create(Xid("c1.r-a", "eu"), deadline=0.0)
    assert isinstance(created, Branch)
    session = FakeSession()
    created.session = session  # type: ignore[assignment]
    created.move_to(BranchState.PREPARED)
    created.move_to(BranchState.COMMITTED)
    registry.finish(created)
    assert session.calls == ["release"]
