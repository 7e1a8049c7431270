"""SP algorithms over torch.distributed, the communication primitives they share, and sequence layouts."""

from seqpar.collectives.comm import CommStats, count_comm
from seqpar.collectives.layout import (
    PaddedSequence,
    local_positions,
    pad_for_layout,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "CommStats",
    "PaddedSequence",
    "count_comm",
    "local_positions",
    "pad_for_layout",
    "shard_sequence",
    "unshard_sequence",
]
