"""Single-device compute with no communication: attention blocks with LSE, chunked linear attention, references."""

from seqpar.kernels.attention import (
    AttentionBackend,
    attention,
    attention_block,
    attention_block_backward,
    attention_block_varlen,
    attention_block_varlen_backward,
    get_attention_backend,
    merge_attention_outputs,
    register_attention_backend,
)
from seqpar.kernels.linear import linear_attention_chunk, linear_attention_inter
from seqpar.kernels.reference import reference_attention, reference_linear_attention

__all__ = [
    "AttentionBackend",
    "attention",
    "attention_block",
    "attention_block_backward",
    "attention_block_varlen",
    "attention_block_varlen_backward",
    "get_attention_backend",
    "linear_attention_chunk",
    "linear_attention_inter",
    "merge_attention_outputs",
    "reference_attention",
    "reference_linear_attention",
    "register_attention_backend",
]
