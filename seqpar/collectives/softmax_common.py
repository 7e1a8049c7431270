"""What the softmax-attention SP ops share: argument checks, the packed view, and the block schedule of the
shard pairs (ring, TokenRing, Ulysses, all-gather-KV).

Every op works on the packed form: q (T_local, H, D), k/v (T_local, H_kv, D) with int32 LOCAL ``cu_seqlens``.
A padded (B, S_local, H, D) batch is the packed batch of B sequences of S_local local tokens each, so one code
path serves both. Checks here are local and identical on every rank, and run before any communication, so a
mistake raises ValueError everywhere instead of leaving peers waiting in a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.layout import LAYOUTS, shard_indices, validate_cu_seqlens
from seqpar.kernels.fused_merge import attention_block_merge
from seqpar.kernels.attention import (
    accumulation_dtype,
    attention_block_varlen,
    attention_block_varlen_backward,
    get_attention_backend,
    merge_attention_outputs,
)


@dataclass
class SoftmaxSP:
    """One call's inputs, checked and packed.

    Attributes:
        q, k, v: packed (T, H, D) / (T, H_kv, D) views of the inputs.
        cu_seqlens: local int32 boundaries of the packed sequences (B sequences for padded input).
        bounds: the same boundaries as a list.
        padded_shape: the (B, S_local) of padded input, to restore the output's shape; None when packed.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    bounds: list[int]
    group: dist.ProcessGroup
    rank: int
    world_size: int
    layout: str
    causal: bool
    scale: float
    padded_shape: tuple[int, int] | None

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, H, D) -> the caller's layout ((B, S_local, H, D) for padded input)."""
        if self.padded_shape is None:
            return packed
        return packed.view(*self.padded_shape, *packed.shape[1:])

    def global_cu_seqlens(self) -> torch.Tensor:
        """Boundaries of the global packed batch (every rank holds 1/P of every sequence)."""
        return (self.cu_seqlens.long() * self.world_size).to(torch.int32)

    def rank_major_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, inverse)``: ``order[i]`` is the global packed index of the i-th token when all ranks' shards
        are concatenated in rank order (what an all-gather or all-to-all yields); ``inverse`` undoes it."""
        cu = self.global_cu_seqlens()
        total = int(cu[-1])
        order = torch.cat(
            [shard_indices(total, self.world_size, r, layout=self.layout, cu_seqlens=cu) for r in range(self.world_size)]
        )
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(total, device="cpu")
        return order.to(self.q.device), inverse.to(self.q.device)

    def chunk_indices(self, which: str) -> torch.Tensor:
        """Local token indices of the first or second zigzag chunk of every sequence (``which``: "first"/"second")."""
        pieces = []
        for a, b in zip(self.bounds, self.bounds[1:]):
            half = (b - a) // 2
            start = a if which == "first" else a + half
            pieces.append(torch.arange(start, start + half, device="cpu"))
        return torch.cat(pieces).to(self.q.device)

    def half_cu_seqlens(self) -> torch.Tensor:
        return (self.cu_seqlens // 2).to(torch.int32)


def prepare_softmax_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    causal: bool,
    softmax_scale: float | None,
    layout: str,
    cu_seqlens: torch.Tensor | None,
    op: str = "softmax attention",
    backend: str = "auto",
    agree: dict[str, object] | None = None,
) -> SoftmaxSP:
    """Check one call's arguments and return the packed view. ``agree``: the op's own options that every rank
    must pass equal too (checked with the common ones).

    Raises:
        ValueError: naming the argument: wrong ranks of tensors, q/k/v shape, dtype or device mismatch,
            H % H_kv != 0, an unknown layout, a local length the layout cannot produce (zigzag needs an even
            number of local tokens per sequence), ``cu_seqlens`` that are not int32 / increasing / do not end at
            the number of local tokens, a kernel backend that cannot run these tensors, or a group this rank is
            not in; and, on every rank, when the ranks of the group disagree on q/k/v shapes, dtype, causal,
            layout, scale or cu_seqlens (``comm.check_agreement``, on by default).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown layout {layout!r}; use one of {LAYOUTS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: dtypes must match q ({q.dtype}); got k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: must be on q's device ({q.device}); got k {k.device}, v {v.device}")
    packed = cu_seqlens is not None
    want = 3 if packed else 4
    shape_doc = "(T_local, H, D) with cu_seqlens" if packed else "(B, S_local, H, D)"
    if q.dim() != want:
        hint = "" if packed or q.dim() != 3 else "; pass cu_seqlens= for packed (T, H, D) input"
        raise ValueError(f"q: expected {shape_doc}, got shape {tuple(q.shape)}{hint}")
    if k.shape != v.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} must equal k's {tuple(k.shape)}")
    if k.dim() != want or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k: expected the same tokens and head dim as q {tuple(q.shape)} with H_kv heads, got {tuple(k.shape)}"
        )
    h, h_kv = q.shape[-2], k.shape[-2]
    if h % h_kv:
        raise ValueError(f"k: q's {h} heads must be a multiple of k/v's {h_kv} heads (GQA)")
    get_attention_backend(backend, q.device, q.dtype)  # an unusable backend fails here, before any transfer
    group, rank, size = comm.group_info(group)

    if packed:
        bounds = validate_cu_seqlens(cu_seqlens, q.shape[0])
        cu = cu_seqlens.to(device=q.device)
        qp, kp, vp = q, k, v
        padded_shape = None
    else:
        b, s = q.shape[:2]
        if s == 0:
            raise ValueError("q: the local sequence is empty")
        bounds = [i * s for i in range(b + 1)]
        cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
        qp, kp, vp = (t.reshape(b * s, *t.shape[2:]) for t in (q, k, v))
        padded_shape = (b, s)
    if layout == "zigzag":
        odd = [b_ - a for a, b_ in zip(bounds, bounds[1:]) if (b_ - a) % 2]
        if odd:
            arg = "cu_seqlens" if packed else "q"
            raise ValueError(
                f"{arg}: zigzag shards hold two equal chunks per sequence, so every local length must be even; "
                f"got {odd[:4]}; shard with seqpar.shard_sequence (pad with seqpar.pad_for_layout)"
            )
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    # every rank of the group must agree on these (a collective, on by default: comm.agreement_checks)
    comm.check_agreement(op, {
        "op": op, "q shape": tuple(q.shape), "k shape": tuple(k.shape), "v shape": tuple(v.shape),
        "dtype": q.dtype, "causal": bool(causal), "layout": layout, "softmax_scale": scale,
        "cu_seqlens": bounds if packed else None, **(agree or {}),
    }, group=group)
    return SoftmaxSP(qp, kp, vp, cu, bounds, group, rank, size, layout, bool(causal), scale, padded_shape)


# ----------------------------------------------------------------------------------------------------
# Blocks: which part of a query shard meets which part of a key/value shard
# ----------------------------------------------------------------------------------------------------
#
# Query shard of rank i meets key/value shard of rank j. With the zigzag layout each shard is two chunks
# (i, 2P-1-i) of every sequence; with a causal mask in global positions:
#   j == i : the local causal mask ("causal")
#   j <  i : every query sees the first chunk of k (chunk j) and none of the second ("k_first_half")
#   j >  i : only the second query chunk (2P-1-i) sees anything, and it sees all of k ("q_second_half")
# With the contiguous layout: j < i "full", j == i "causal", j > i nothing ("skip"). Without a mask: "full".

BLOCK_KINDS = ("full", "causal", "k_first_half", "q_second_half", "skip")


def block_kind(layout: str, causal: bool, q_rank: int, kv_rank: int) -> str:
    """Which of ``BLOCK_KINDS`` the query shard of ``q_rank`` and the K/V shard of ``kv_rank`` form."""
    if not causal:
        return "full"
    if q_rank == kv_rank:
        return "causal"
    if layout == "contiguous":
        return "full" if kv_rank < q_rank else "skip"
    return "k_first_half" if kv_rank < q_rank else "q_second_half"


def block_operands(
    sp: SoftmaxSP, kind: str
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(q_rows, kv_rows, cu_seqlens_q, cu_seqlens_k)`` of a block kind: which local rows of the query and of
    the K/V shard take part (None: all) and the packed boundaries of those rows. ``kind`` is not "skip"."""
    cu = sp.cu_seqlens
    if kind == "k_first_half":
        return None, sp.chunk_indices("first"), cu, sp.half_cu_seqlens()
    if kind == "q_second_half":
        return sp.chunk_indices("second"), None, sp.half_cu_seqlens(), cu
    return None, None, cu, cu


def _rows(t: torch.Tensor, rows: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    return t if rows is None else t.index_select(dim, rows)


def attend_block(
    sp: SoftmaxSP, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, backend: str = "auto"
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Run the kernel on one block; returns ``(rows, out, lse)``: the query rows it covers (None: all), their
    partial output and LSE (H, rows). ``kind`` must not be "skip"."""
    q_rows, kv_rows, cu_q, cu_k = block_operands(sp, kind)
    out, lse = attention_block_varlen(
        _rows(q, q_rows), _rows(k, kv_rows), _rows(v, kv_rows), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        causal=kind == "causal", scale=sp.scale, backend=backend,
    )
    return q_rows, out, lse


def attend_and_merge(
    sp: SoftmaxSP,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend this rank's queries to one K/V shard and fold the result into the running packed (T, H, D) out and
    (H, T) lse; in the kernel epilogue when the backend fuses the merge (Triton), else as a second pass."""
    rows, kv_rows, cu_q, cu_k = block_operands(sp, kind)
    q, k, v = _rows(sp.q, rows), _rows(k, kv_rows), _rows(v, kv_rows)
    if rows is not None and out is None:
        acc = accumulation_dtype(q.dtype)
        out = q.new_zeros((sp.q.shape[0], q.shape[1], v.shape[-1]), dtype=acc)
        lse = torch.full((q.shape[1], sp.q.shape[0]), float("-inf"), dtype=acc, device=q.device)
    sub_out = None if out is None else _rows(out, rows)
    sub_lse = None if lse is None else _rows(lse, rows, dim=1)
    new_out, new_lse = attention_block_merge(
        q, k, v, sub_out, sub_lse, causal=kind == "causal", scale=sp.scale, backend=backend,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
    )
    if rows is None:
        return new_out, new_lse
    out, lse = out.clone(), lse.clone()
    out[rows], lse[:, rows] = new_out, new_lse
    return out, lse


def attend_block_backward(
    sp: SoftmaxSP,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kind: str,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the FINAL out/lse of the query rows; returns
    ``(q_rows, dq, kv_rows, dk, dv)`` where rows None means all rows of the shard."""
    q_rows, kv_rows, cu_q, cu_k = block_operands(sp, kind)
    dq, dk, dv = attention_block_varlen_backward(
        _rows(dout, q_rows), _rows(q, q_rows), _rows(k, kv_rows), _rows(v, kv_rows), _rows(out, q_rows),
        _rows(lse, q_rows, dim=1), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=kind == "causal",
        scale=sp.scale, backend=backend,
    )
    return q_rows, dq, kv_rows, dk, dv


def merge_rows(
    out: torch.Tensor | None, lse: torch.Tensor | None, rows: torch.Tensor | None, block_out: torch.Tensor,
    block_lse: torch.Tensor, total: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block partial that covers ``rows`` (None: all) into the running packed (T, H, D) out and (H, T) lse."""
    if rows is None:
        return merge_attention_outputs(out, lse, block_out, block_lse)
    if out is None:
        acc = accumulation_dtype(block_out.dtype)
        out = block_out.new_zeros((total, *block_out.shape[1:]), dtype=acc)
        lse = torch.full((block_lse.shape[0], total), float("-inf"), dtype=acc, device=block_out.device)
    sub_out, sub_lse = merge_attention_outputs(out[rows], lse[:, rows], block_out, block_lse)
    out, lse = out.clone(), lse.clone()
    out[rows], lse[:, rows] = sub_out, sub_lse
    return out, lse


def add_rows(target: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> None:
    """``target[rows] += values`` in target's dtype (rows None: all rows)."""
    if rows is None:
        target += values
    else:
        target.index_add_(0, rows, values.to(target.dtype))


class _ScheduledAttention(torch.autograd.Function):
    """Autograd for ops with their own forward/backward schedules (ring, TokenRing): saves only q, k, v, out
    and lse, and hands the packed dout to the backward schedule."""

    @staticmethod
    def forward(ctx, q, k, v, sp: SoftmaxSP, backend: str, forward_fn, backward_fn):
        out, lse = forward_fn(sp, backend)
        out = out.to(q.dtype)
        ctx.sp, ctx.backend, ctx.backward_fn = sp, backend, backward_fn
        ctx.save_for_backward(sp.q, sp.k, sp.v, out, lse)
        return sp.unpack(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        sp = ctx.sp
        sp.q, sp.k, sp.v = q, k, v
        dq, dk, dv = ctx.backward_fn(sp, dout.reshape(out.shape).contiguous(), out, lse, ctx.backend)
        return sp.unpack(dq), sp.unpack(dk), sp.unpack(dv), None, None, None, None


def run_scheduled(q, k, v, sp: SoftmaxSP, backend: str, forward_fn, backward_fn) -> torch.Tensor:
    """Apply an op given as ``forward_fn(sp, backend) -> (packed out, lse)`` and
    ``backward_fn(sp, dout, out, lse, backend) -> (dq, dk, dv)``; differentiable in q, k, v."""
    return _ScheduledAttention.apply(q, k, v, sp, backend, forward_fn, backward_fn)
