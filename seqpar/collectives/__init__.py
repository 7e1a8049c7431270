"""SP algorithms over torch.distributed, the communication primitives they share, and sequence layouts."""

from seqpar.collectives.scan import all_scan
from seqpar.collectives.allgather_kv import allgather_kv_attention
from seqpar.collectives.comm import CommStats, count_comm
from seqpar.collectives.layout import (
    PaddedSequence,
    local_positions,
    pad_for_layout,
    shard_sequence,
    unshard_sequence,
)
from seqpar.collectives.lasp2 import lasp2_linear_attention
from seqpar.collectives.ring import ring_attention
from seqpar.collectives.token_ring import token_ring_attention
from seqpar.collectives.ulysses import ulysses_attention
from seqpar.collectives.usp import usp_attention
from seqpar.collectives.zeco import zeco_linear_attention

__all__ = [
    "CommStats",
    "all_scan",
    "lasp2_linear_attention",
    "zeco_linear_attention",
    "allgather_kv_attention",
    "ring_attention",
    "token_ring_attention",
    "ulysses_attention",
    "usp_attention",
    "PaddedSequence",
    "count_comm",
    "local_positions",
    "pad_for_layout",
    "shard_sequence",
    "unshard_sequence",
]
