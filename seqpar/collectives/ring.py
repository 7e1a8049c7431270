"""Ring attention: K/V blocks travel around the ring while every rank attends its queries to them.

Forward, P ranks, step s = 0 .. P-1: rank r holds the K/V shard of rank j = r - s. Before running the block
kernel of step s it issues the transfer that brings the shard of step s + 1 (send to r + 1, receive from
r - 1), so the transfer overlaps the kernel. Partial (out, lse) are merged in float32 with the -inf safe
update, inside the kernel's epilogue when the backend fuses it (Triton). Blocks that a causal mask hides
completely are skipped (see ``softmax_common.block_kind``; with zigzag every rank does the same work).

Backward, same ring: at step s rank r holds the K/V shard of rank j = r - s again (re-sent, overlapped the same
way) and a float32 accumulator of dK/dV for shard j that travels one step behind it: created empty at step 1,
it collects the contribution of every rank it visits and, after the last step, arrives home at rank j, which
adds its own contribution (kept local since step 0). dQ never leaves the rank. Saved for backward: q, k, v,
out, lse only.

Bytes sent per rank (b: element size of the inputs, T: local tokens, all sequences together):

=========  ==============================================================
forward    (P - 1) * 2 * T * H_kv * D * b                         (K and V)
backward   (P - 1) * 2 * T * H_kv * D * b  +  (P - 1) * 2 * T * H_kv * D * 4
           (K and V again, then the float32 dK/dV accumulators)
=========  ==============================================================
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.softmax_common import (
    SoftmaxSP,
    add_rows,
    attend_and_merge,
    attend_block_backward,
    block_kind,
    prepare_softmax_sp,
    run_scheduled,
)
from seqpar.kernels.attention import accumulation_dtype

__all__ = ["ring_attention"]

_KV_STREAM, _DKV_STREAM = 0, 1  # ring_exchange streams: their tags are in comm.tags (RING_NEXT + 100 * stream)


def _ring_forward(sp: SoftmaxSP, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (T, H, D) out in the accumulation dtype and (H, T) lse."""
    kv = torch.stack([sp.k, sp.v])  # one message per step; only step 0's copy is extra (later: received buffers)
    out = lse = None
    for step in range(sp.world_size):
        pending = comm.ring_exchange(kv, group=sp.group, stream=_KV_STREAM) if step < sp.world_size - 1 else None
        kind = block_kind(sp.layout, sp.causal, sp.rank, (sp.rank - step) % sp.world_size)
        if kind != "skip":
            out, lse = attend_and_merge(sp, kv[0], kv[1], kind, out, lse, backend)
        if pending is not None:
            kv = pending.wait()[0]
    return out, lse


def _ring_backward(
    sp: SoftmaxSP, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(sp.q.dtype)
    dq = own_dk = own_dv = None  # step 0's block gradients become these accumulators (no zero-filled copies)
    kv = torch.stack([sp.k, sp.v])
    pending_dkv = None
    for step in range(sp.world_size):
        pending_kv = comm.ring_exchange(kv, group=sp.group, stream=_KV_STREAM) if step < sp.world_size - 1 else None
        kind = block_kind(sp.layout, sp.causal, sp.rank, (sp.rank - step) % sp.world_size)
        grads = None
        if kind != "skip":
            q_rows, g_q, kv_rows, g_k, g_v = attend_block_backward(sp, dout, sp.q, kv[0], kv[1], out, lse, kind,
                                                                   backend, views=True)
            dq = _accumulate(dq, q_rows, g_q, sp.q.shape, acc)
            grads = (kv_rows, g_k, g_v)
            del g_q, g_k, g_v
        if step == 0:  # our own shard's dK/dV stay home (step 0's block always reads it: causal or full)
            own_dk = _accumulate(None, grads[0], grads[1], sp.k.shape, acc)
            own_dv = _accumulate(None, grads[0], grads[2], sp.k.shape, acc)
        else:
            if pending_dkv is None:  # step 1: the accumulator of shard r - 1 starts here
                target = torch.zeros((2, *sp.k.shape), dtype=acc, device=sp.k.device)
            else:  # what the previous rank accumulated for shard r - step so far: ours is added into that buffer
                target = pending_dkv.wait()[0]
            if grads is not None:
                add_rows(target[0], grads[0], grads[1])
                add_rows(target[1], grads[0], grads[2])
            grads = None  # the block's dK/dV are freed before the exchange allocates its receive buffer
            pending_dkv = comm.ring_exchange(target, group=sp.group, stream=_DKV_STREAM)
            del target
        grads = None
        if pending_kv is not None:
            kv = pending_kv.wait()[0]
    if pending_dkv is not None:  # after the last step the accumulator of our own shard arrives home
        home = pending_dkv.wait()[0]
        own_dk += home[0]
        own_dv += home[1]
    return dq.to(sp.q.dtype), own_dk.to(sp.k.dtype), own_dv.to(sp.v.dtype)


def _accumulate(total: torch.Tensor | None, rows, values: torch.Tensor, shape: torch.Size,
                acc: torch.dtype) -> torch.Tensor:
    """``total[rows] += values`` (rows None: all). ``total`` None starts the sum from ``values``, the kernel's
    fresh gradient, which is kept as it is when it covers every row in the accumulation dtype (no copy)."""
    if total is None:
        if rows is None:
            return values.to(acc)
        total = torch.zeros(shape, dtype=acc, device=values.device)
    add_rows(total, rows, values)
    return total


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Sequence-parallel softmax attention over ``group`` by passing K/V around a ring. Differentiable.

    Args:
        q: this rank's queries, (B, S_local, H, D), or packed (T_local, H, D) with ``cu_seqlens``.
        k, v: this rank's keys/values, (B, S_local, H_kv, D) or (T_local, H_kv, D); H % H_kv == 0.
        group: the SP process group (default: the world).
        causal: causal mask in GLOBAL token positions.
        softmax_scale: default 1 / sqrt(D).
        layout: how the shards were cut, ``"zigzag"`` (balanced causal work) or ``"contiguous"``; exactly as
            ``seqpar.shard_sequence`` makes them.
        cu_seqlens: int32 LOCAL cumulative lengths of a packed batch (from ``shard_sequence(..., cu_seqlens=)``).
        backend: kernel backend, ``"auto"``, ``"torch"``, ``"triton"`` or ``"flash_attn"``.
        max_seqlen: with ``cu_seqlens``, the longest local sequence, from whoever packed and validated the batch
            (``StepShard.max_seqlen``: the runtime, once per step). Given, ``cu_seqlens`` is not read on the host
            (no device sync per layer) and is trusted to be valid; None: it is read and validated here.

    Returns:
        This rank's output, shaped like ``q``, in q's dtype.

    Raises:
        ValueError: bad shapes, dtypes, layout, ``cu_seqlens`` or group, on every rank, before any communication.
    """
    sp = prepare_softmax_sp(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, cu_seqlens=cu_seqlens,
        op="ring_attention",
        backend=backend, max_seqlen=max_seqlen,
    )
    return run_scheduled(q, k, v, sp, backend, _ring_forward, _ring_backward)
