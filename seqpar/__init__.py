"""seqpar: sequence-parallel runtime for long-context training with PyTorch."""

from seqpar.collectives import (
    CommStats,
    allgather_kv_attention,
    ring_attention,
    token_ring_attention,
    ulysses_attention,
    PaddedSequence,
    count_comm,
    local_positions,
    pad_for_layout,
    shard_sequence,
    unshard_sequence,
)
from seqpar.integrations import register_adapter
from seqpar.parallelize import SPModel, SPOutput, parallelize

__version__ = "0.1.0"

__all__ = [
    "CommStats",
    "allgather_kv_attention",
    "ring_attention",
    "token_ring_attention",
    "ulysses_attention",
    "PaddedSequence",
    "count_comm",
    "local_positions",
    "pad_for_layout",
    "parallelize",
    "register_adapter",
    "SPModel",
    "SPOutput",
    "shard_sequence",
    "unshard_sequence",
]
