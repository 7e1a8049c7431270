"""seqpar: sequence-parallel runtime for long-context training with PyTorch."""

from seqpar.collectives import (
    CommStats,
    PaddedSequence,
    count_comm,
    local_positions,
    pad_for_layout,
    shard_sequence,
    unshard_sequence,
)

__version__ = "0.1.0"

__all__ = [
    "CommStats",
    "PaddedSequence",
    "count_comm",
    "local_positions",
    "pad_for_layout",
    "shard_sequence",
    "unshard_sequence",
]
