"""Single-device compute with no communication: attention blocks with LSE, chunked linear attention, references.

The bottom layer: nothing here imports ``seqpar.collectives`` or above (``seqpar.tracing`` is a leaf anyone may
import). Files:

* ``attention.py``          softmax block kernels' contract, backend registry, torch backend, dispatch, autograd
* ``fused_merge.py``        attention of one K/V block merged into a running (out, lse), fused where a backend can
* ``triton_attention_kernels.py`` / ``triton_attention.py``   the Triton @jit kernels / their launch code + backends
* ``flash_attn_backend.py`` flash-attn 2.x as a backend (CUDA only)
* ``linear.py``             chunked linear attention: backend registry, torch backend, the pieces LASP-2/ZeCO use
* ``triton_linear.py``      the Triton linear-attention kernels and their backend
* ``triton_delta_rule.py``  the Triton gated delta rule (``delta_rule.chunk_gated_delta_rule(backend="triton")``)
* ``varlen.py``             ``validate_cu_seqlens``, the one check of packed-batch boundaries
* ``reference.py``          float64 definitions for tests
"""

from seqpar.kernels.attention import (
    AttentionBackend,
    apply_attention_sinks,
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
from seqpar.kernels.linear import (
    LinearBackend,
    chunk_state,
    get_linear_backend,
    linear_attention_chunk,
    linear_attention_inter,
    register_linear_backend,
)
from seqpar.kernels.reference import reference_attention, reference_linear_attention
from seqpar.kernels.varlen import validate_cu_seqlens

# Optional GPU backends register themselves when they import. A missing or broken triton / flash-attn only
# leaves its backend out (the reason is kept here for diagnostics); `import seqpar` never fails on them.
OPTIONAL_BACKEND_ERRORS: dict[str, str] = {}
try:
    from seqpar.kernels import triton_attention as _triton_attention
    from seqpar.kernels import triton_linear as _triton_linear

    _triton_attention.register()
    _triton_linear.register()
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
    "LinearBackend",
    "apply_attention_sinks",
    "attention",
    "attention_block",
    "attention_block_backward",
    "attention_block_merge",
    "attention_block_varlen",
    "attention_block_varlen_backward",
    "chunk_state",
    "get_attention_backend",
    "get_linear_backend",
    "has_fused_merge",
    "linear_attention_chunk",
    "linear_attention_inter",
    "merge_attention_outputs",
    "reference_attention",
    "reference_linear_attention",
    "register_attention_backend",
    "register_linear_backend",
    "validate_cu_seqlens",
]
