"""Attention of q against one K/V block, merged into a running (out, lse): fused where a backend can, else unfused.

Ring and TokenRing keep a float32 running ``(out_acc, lse_acc)`` per query row and fold every K/V block into it.
The unfused path runs ``attention_block`` and then ``merge_attention_outputs`` (a second pass over out);
backends that can do the merge in their kernel epilogue register a fused function here
(``register_fused_merge``); the Triton backends do.

Shapes: padded q (B, Sq, H, D), k/v (B, Sk, H_kv, D), out_acc (B, Sq, H, D) float32, lse_acc (B, H, Sq); or
packed q (Tq, H, D), k/v (Tk, H_kv, D), out_acc (Tq, H, D), lse_acc (H, Tq) with int32 cu_seqlens_q/k.
Returns new ``(out, lse)`` in the accumulation dtype (float32; float64 for float64 input); the inputs are
not modified. Forward only, like ``attention_block``: the backward of the merged result is
``attention_block_backward`` with the final out/lse.
"""

from __future__ import annotations

from typing import Callable

import torch

from seqpar.kernels.attention import (
    attention_block,
    attention_block_varlen,
    call_features,
    get_attention_backend,
    merge_attention_outputs,
    merge_attention_outputs_,
)

__all__ = ["attention_block_merge", "has_fused_merge", "register_fused_merge"]

_FUSED: dict[str, Callable] = {}


def register_fused_merge(backend_name: str, fn: Callable) -> None:
    """Register ``fn(q, k, v, out_acc, lse_acc, *, causal, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k) -> (out, lse)`` as the fused merge of the attention backend called ``backend_name``. Calls
    that use options (``window``, ``softcap``, ``q_positions``/``k_positions``) pass them as keywords too when
    the backend has them (``features``), so ``fn`` must take them for every feature its backend declares."""
    _FUSED[backend_name] = fn


def has_fused_merge(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` (resolved like ``attention_block`` resolves it) merges inside its kernel.

    Raises:
        ValueError: as ``get_attention_backend`` (unknown backend, or one that cannot run here).
    """
    return get_attention_backend(backend, device, dtype).name in _FUSED


def attention_block_merge(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_acc: torch.Tensor | None,
    lse_acc: torch.Tensor | None,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_attention_outputs(out_acc, lse_acc, *attention_block(q, k, v))`` in one call; fused when the
    resolved backend registered a fused merge. ``out_acc=lse_acc=None`` starts from this block.
    ``max_seqlen_q``/``max_seqlen_k``: the packed form's hints (see ``attention_block_varlen``). ``window``,
    ``softcap``, ``q_positions``/``k_positions``: as ``attention_block``; the fused merge takes them too.
    ``in_place``: the unfused merge updates ``out_acc``/``lse_acc`` (the caller's accumulators, in the
    accumulation dtype) and returns them; a fused one may still return new tensors.

    Raises:
        ValueError: only one of out_acc/lse_acc, or of cu_seqlens_q/cu_seqlens_k, given; anything
            ``attention_block``/``attention_block_varlen`` raise.
    """
    if (out_acc is None) != (lse_acc is None):
        raise ValueError("lse_acc: pass both out_acc and lse_acc, or neither")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_k: pass both cu_seqlens_q and cu_seqlens_k, or neither")
    options = {name: value for name, value in (("window", window), ("softcap", softcap),
                                               ("q_positions", q_positions), ("k_positions", k_positions))
               if value is not None}
    needs = call_features(q, v, window=window, softcap=softcap, positions=q_positions is not None)
    impl = get_attention_backend(backend, q.device, q.dtype, needs=needs)
    fused = _FUSED.get(impl.name)
    if fused is not None:
        return fused(
            q, k, v, out_acc, lse_acc, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **options,
        )
    if cu_seqlens_q is None:
        block_out, block_lse = attention_block(q, k, v, causal=causal, scale=scale, backend=impl.name, **options)
    else:
        block_out, block_lse = attention_block_varlen(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal, scale=scale,
            backend=impl.name, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **options,
        )
    if in_place and out_acc is not None:
        return merge_attention_outputs_(out_acc, lse_acc, block_out, block_lse)
    return merge_attention_outputs(out_acc, lse_acc, block_out, block_lse)
