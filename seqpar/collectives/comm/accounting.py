"""What this rank sends: ``count_comm()`` blocks and the record hook every transfer calls.

Byte conventions (nccl-tests "bus bandwidth", what one rank puts on the wire):

================  ==========================================
send / isend      bytes of the tensor sent
all_gather        input bytes * (P - 1)
all_to_all        bytes of the pieces sent to other ranks (= input bytes * (P - 1) / P for equal splits)
reduce_scatter    input bytes * (P - 1) / P   (input: the full, unscattered tensor)
all_reduce        2 * bytes * (P - 1) // P
broadcast         8 + payload bytes, on the source rank
================  ==========================================

The cross-rank agreement check (``comm.agreement``) is not counted: it is a few bytes of metadata per call,
and the counters are compared with each algorithm's byte formula.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from seqpar import tracing

__all__ = ["CommStats", "count_comm", "nbytes", "record"]


@dataclass
class CommStats:
    """What this rank sent inside a ``count_comm()`` block.

    Attributes:
        bytes_sent: total bytes, by the conventions in the module docstring.
        calls: operation name -> number of calls.
        bytes_by_op: operation name -> bytes.
        bytes_by_peer: global rank of the receiver -> bytes, for point-to-point sends.
        bytes_by_direction: ``"next"`` / ``"prev"`` -> bytes, for ring sends.
    """

    bytes_sent: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    bytes_by_op: dict[str, int] = field(default_factory=dict)
    bytes_by_peer: dict[int, int] = field(default_factory=dict)
    bytes_by_direction: dict[str, int] = field(default_factory=dict)

    def _add(self, op: str, nbytes: int, peer: int | None, direction: str | None) -> None:
        self.bytes_sent += nbytes
        self.calls[op] = self.calls.get(op, 0) + 1
        self.bytes_by_op[op] = self.bytes_by_op.get(op, 0) + nbytes
        if peer is not None:
            self.bytes_by_peer[peer] = self.bytes_by_peer.get(peer, 0) + nbytes
        if direction is not None:
            self.bytes_by_direction[direction] = self.bytes_by_direction.get(direction, 0) + nbytes


class _OpenCounters:
    """The ``count_comm()`` blocks open in this process; every transfer is added to all of them."""

    def __init__(self) -> None:
        self.stack: list[CommStats] = []


_open = _OpenCounters()


@contextlib.contextmanager
def count_comm() -> Iterator[CommStats]:
    """Count what this rank sends inside the block (nests: every open counter sees every transfer)."""
    stats = CommStats()
    _open.stack.append(stats)
    try:
        yield stats
    finally:
        _open.stack.remove(stats)


def record(op: str, nbytes: int, *, peer: int | None = None, direction: str | None = None) -> None:
    """Add one transfer to every open counter and to the trace (``seqpar.tracing``, kind ``"comm"``)."""
    for stats in _open.stack:
        stats._add(op, int(nbytes), peer, direction)
    tracing.record("comm", op=op, bytes=int(nbytes), peer=peer, direction=direction)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
