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
from seqpar.kernels.fused_merge import attention_block_merge, has_fused_merge
from seqpar.kernels.linear import linear_attention_chunk, linear_attention_inter
from seqpar.kernels.reference import reference_attention, reference_linear_attention

# Optional GPU backends register themselves when they import. A missing or broken triton / flash-attn only
# leaves its backend out (the reason is kept here for diagnostics); `import seqpar` never fails on them.
OPTIONAL_BACKEND_ERRORS: dict[str, str] = {}
try:
    from seqpar.kernels import triton_attention as _triton_attention

    _triton_attention.register()
except Exception as _exc:  # noqa: BLE001
    OPTIONAL_BACKEND_ERRORS["triton"] = f"{type(_exc).__name__}: {_exc}"
try:
    from seqpar.kernels import flash_attn_backend as _flash_attn_backend

    if not _flash_attn_backend.register():
        OPTIONAL_BACKEND_ERRORS["flash_attn"] = _flash_attn_backend.IMPORT_ERROR or "not available"
except Exception as _exc:  # noqa: BLE001
    OPTIONAL_BACKEND_ERRORS["flash_attn"] = f"{type(_exc).__name__}: {_exc}"

__all__ = [
    "AttentionBackend",
    "attention",
    "attention_block",
    "attention_block_backward",
    "attention_block_merge",
    "attention_block_varlen",
    "attention_block_varlen_backward",
    "get_attention_backend",
    "has_fused_merge",
    "linear_attention_chunk",
    "linear_attention_inter",
    "merge_attention_outputs",
    "reference_attention",
    "reference_linear_attention",
    "register_attention_backend",
]
