"""How the Pipeline stream's messages are cut: both ends (the coordinator's agent clients and the
agent's servicer) keep a message within the same budget."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from twopc.api import twopc_pb2 as pb

#: What one pipeline message carries at most, unless a single call or answer is larger (it then
#: goes alone, within gRPC's message limit, as its unary twin would).
MESSAGE_BUDGET_BYTES = 4 * 1024 * 1024

_Message = TypeVar("_Message", pb.PipelineCall, pb.PipelineAnswer)


def split_by_size(
    items: Sequence[_Message], budget: int = MESSAGE_BUDGET_BYTES
) -> Iterator[list[_Message]]:
    """``items`` in order, in runs whose serialized size stays within ``budget``."""
    run: list[_Message] = []
    size = 0
    for item in items:
        item_size = item.ByteSize()
        if run and size + item_size > budget:
            yield run
            run, size = [], 0
        run.append(item)
        size += item_size
    if run:
        yield run
