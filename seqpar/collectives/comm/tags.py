"""Every point-to-point message tag seqpar uses, in one table.

gloo (like MPI) matches a receive to a send by (source rank, tag) inside a process group, and in posting order
among equal tags. Two streams of messages that can be in flight between the same two ranks at the same time
therefore need different tags, or a message of one stream fills the receive posted for the other: at P = 2
both ring directions connect the same two ranks, TokenRing's queries and partials go to the same peer, and a
pipelined scan keeps one message per piece in flight. Consecutive calls of one op (one per layer) may reuse
their tags: messages with equal tags between two ranks are matched in order. Point-to-point messages travel on
the default group's connections (``comm.exchange`` addresses peers by global rank), so two ops on different
sub-groups that share a pair of ranks and run at the same time (USP's ring inside a 2-D layout) need different
tags as well: give such a stream its own block here.

Each ``TagBlock`` is a range of tags owned by one stream kind; the blocks never overlap (checked at import).
``direction`` is the ring direction the stream travels in, what ``CommStats.bytes_by_direction`` counts its
sends under (None: not a ring direction).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "P2P",
    "RING_NEXT",
    "RING_PREV",
    "RING_STREAMS",
    "SCAN_NEXT",
    "SCAN_PIECES",
    "SCAN_PREV",
    "TABLE",
    "TOKEN_RING_PARTIALS",
    "TOKEN_RING_QUERIES",
    "HALO_GRAD",
    "HALO_NEXT",
    "ZECO_FINAL_GRAD",
    "ZECO_FINAL_STATE",
    "TagBlock",
    "direction_of",
    "ring_tag",
]


@dataclass(frozen=True)
class TagBlock:
    """Tags ``first, first + stride, ..., first + (count - 1) * stride`` belong to the stream ``name``."""

    name: str
    first: int
    count: int
    stride: int
    direction: str | None
    used_by: str

    def tags(self) -> range:
        return range(self.first, self.first + self.count * self.stride, self.stride)


RING_STREAMS = 4  # ring_exchange(stream=s) for s in 0..3: ring attention uses 0 (K/V) and 1 (dK/dV accumulators)
RING_NEXT = 11  # + 100 * stream: data travelling to rank + 1
RING_PREV = 12  # + 100 * stream: data travelling to rank - 1
P2P = 13  # comm.send / comm.recv without an explicit tag
TOKEN_RING_PARTIALS = 1011  # partial (out, lse) / dQ on their way back to the owner of the queries
TOKEN_RING_QUERIES = 1012  # query shards (backward: with dout, out, lse) on their way to rank - 1
SCAN_PIECES = 999  # the All-Scan sends piece j of a state with tag SCAN_NEXT + j (SCAN_PREV + j reversed)
SCAN_NEXT = 7000
ZECO_FINAL_STATE = 7999  # rank P-1 -> every rank: the final state
SCAN_PREV = 8000
ZECO_FINAL_GRAD = 8999  # every rank -> rank P-1: its final-state gradient
HALO_NEXT = 9001  # halo exchange: a rank's last w - 1 tokens to rank + 1 (causal conv1d context)
HALO_GRAD = 9002  # halo exchange backward: the halo's gradient back to its owner, rank - 1

TABLE: tuple[TagBlock, ...] = (
    TagBlock("ring, to rank + 1", RING_NEXT, RING_STREAMS, 100, "next", "comm.ring_exchange (ring attention)"),
    TagBlock("ring, to rank - 1", RING_PREV, RING_STREAMS, 100, "prev", "comm.ring_exchange (ring attention)"),
    TagBlock("explicit peer", P2P, 1, 1, None, "comm.send / comm.recv default"),
    TagBlock("TokenRing partials", TOKEN_RING_PARTIALS, 1, 1, "next", "token_ring"),
    TagBlock("TokenRing queries", TOKEN_RING_QUERIES, 1, 1, "prev", "token_ring"),
    TagBlock("All-Scan pieces, forward", SCAN_NEXT, SCAN_PIECES, 1, "next", "scan (ZeCO forward)"),
    TagBlock("ZeCO final state", ZECO_FINAL_STATE, 1, 1, None, "zeco"),
    TagBlock("All-Scan pieces, reverse", SCAN_PREV, SCAN_PIECES, 1, "prev", "scan (ZeCO backward)"),
    TagBlock("ZeCO final-state gradients", ZECO_FINAL_GRAD, 1, 1, None, "zeco"),
    TagBlock("halo, to rank + 1", HALO_NEXT, 1, 1, "next", "halo (conv1d context)"),
    TagBlock("halo gradients, to rank - 1", HALO_GRAD, 1, 1, "prev", "halo (backward)"),
)


def _owner_of_every_tag() -> dict[int, TagBlock]:
    owner: dict[int, TagBlock] = {}
    for block in TABLE:
        for tag in block.tags():
            if tag in owner:
                raise AssertionError(f"seqpar tag table: tag {tag} is in both {owner[tag].name!r} and {block.name!r}")
            owner[tag] = block
    return owner


_OWNER = _owner_of_every_tag()


def ring_tag(direction: str, stream: int) -> int:
    """The tag of ``ring_exchange`` messages in ``direction`` ("next"/"prev") on ``stream``.

    Raises:
        ValueError: ``stream`` not an int in [0, RING_STREAMS).
    """
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < RING_STREAMS:
        raise ValueError(f"stream: must be an int in [0, {RING_STREAMS}) (see comm.tags.TABLE), got {stream!r}")
    return (RING_NEXT if direction == "next" else RING_PREV) + 100 * stream


def direction_of(tag: int) -> str | None:
    """The ring direction a message with ``tag`` travels in (None: not a ring stream, or not in the table)."""
    block = _OWNER.get(tag)
    return None if block is None else block.direction
