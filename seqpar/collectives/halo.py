"""Halo exchange for short causal convolutions over a sequence split across ranks (contiguous layout).

A causal conv1d of kernel width w (the one before q/k/v in Gated DeltaNet, KDA, Mamba) reads, for a rank's
first w - 1 tokens, the last w - 1 tokens of rank r - 1. ``halo_exchange`` prepends them (zeros on rank 0, as
the conv's zero padding): rank r sends its last ``width`` tokens to rank r + 1 and receives rank r - 1's, one
point-to-point exchange (tag ``comm.tags.HALO_NEXT``). Backward runs the other way: the gradient of the halo
goes back to its owner (``HALO_GRAD``, to rank - 1) and is added to its last ``width`` tokens' gradient.

Bytes sent per rank: forward ``[r < P-1] * B * width * C * e``, backward ``[r > 0] * B * width * C * e`` (e the
element size of x; C the product of the trailing dims). ``causal_conv1d`` = the exchange + the local conv.

When every rank holds at least ``width`` tokens the halo comes from one neighbour in one exchange; when every
rank holds fewer (equal shards of a short sequence) the halo is relayed down a chain (receive from r - 1, then
send the last ``width`` tokens of (halo, x) to r + 1): P - 1 dependent hops, same bytes. Ranks must agree on
which (checked). Packed batches: ``causal_conv1d(..., cu_seqlens=)`` sends every sequence's halo in one
exchange each way (bytes: N_seq times the above).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.collectives import comm
from seqpar.kernels.varlen import validate_cu_seqlens

__all__ = ["causal_conv1d", "halo_exchange"]

TAG_HALO = comm.tags.HALO_NEXT
TAG_HALO_GRAD = comm.tags.HALO_GRAD


class _Halo(torch.autograd.Function):
    """Forward: rank r receives the ``width`` tokens before its shard from r - 1 and sends its last ``width``
    tokens of (halo, x) to r + 1; backward: the reverse. One exchange per direction when every shard holds at
    least ``width`` tokens (the send does not depend on the receive); a chain (receive, then send) otherwise."""

    @staticmethod
    def forward(ctx, x, width, group, rank, size, chained):
        shape = (x.shape[0], width, *x.shape[2:])
        halo = x.new_zeros(shape)
        sends, recvs = [], []
        if rank > 0:
            recvs.append(((shape, x.dtype), rank - 1, TAG_HALO))
        if chained and recvs:  # a short shard: the tokens rank r + 1 needs include some of rank r - 1's
            halo = comm.exchange([], recvs, group=group, device=x.device, describe=f"halo on rank {rank}").wait()[0]
            recvs = []
        if rank < size - 1:
            sends.append((torch.cat([halo, x], 1)[:, -width:].contiguous(), rank + 1, TAG_HALO))
        if sends or recvs:
            got = comm.exchange(sends, recvs, group=group, device=x.device, describe=f"halo on rank {rank}").wait()
            if recvs:
                halo = got[0]
        ctx.width, ctx.group, ctx.rank, ctx.size, ctx.chained = width, group, rank, size, chained
        return torch.cat([halo, x], 1)

    @staticmethod
    def backward(ctx, dy):
        width, rank, size = ctx.width, ctx.rank, ctx.size
        d_full = dy.clone()
        shape = (dy.shape[0], width, *dy.shape[2:])
        sends, recvs = [], []
        if rank < size - 1:  # the gradient of what this rank sent to r + 1, its last width tokens of (halo, x)
            recvs.append(((shape, dy.dtype), rank + 1, TAG_HALO_GRAD))
        if ctx.chained and recvs:
            d_full[:, -width:] += comm.exchange([], recvs, group=ctx.group, device=dy.device,
                                                describe=f"halo backward on rank {rank}").wait()[0]
            recvs = []
        if rank > 0:
            sends.append((d_full[:, :width].contiguous(), rank - 1, TAG_HALO_GRAD))
        if sends or recvs:
            got = comm.exchange(sends, recvs, group=ctx.group, device=dy.device,
                                describe=f"halo backward on rank {rank}").wait()
            if recvs:
                d_full[:, -width:] += got[0]
        return d_full[:, width:], None, None, None, None, None


class _SegmentHalos(torch.autograd.Function):
    """Packed batch, every sequence's local piece >= ``width``: the halos of all N sequences in ONE exchange each
    way. Forward returns (B, N * width, ...): sequence j's halo at [j * width, (j + 1) * width)."""

    @staticmethod
    def forward(ctx, x, width, segments, group, rank, size):
        shape = (x.shape[0], len(segments) * width, *x.shape[2:])
        sends = [] if rank == size - 1 else [
            (torch.cat([x[:, b - width:b] for _, b in segments], 1).contiguous(), rank + 1, TAG_HALO)]
        recvs = [] if rank == 0 else [((shape, x.dtype), rank - 1, TAG_HALO)]
        halos = x.new_zeros(shape)
        if sends or recvs:
            got = comm.exchange(sends, recvs, group=group, device=x.device, describe=f"halo on rank {rank}").wait()
            if recvs:
                halos = got[0]
        ctx.width, ctx.segments, ctx.group, ctx.rank, ctx.size = width, segments, group, rank, size
        ctx.x_shape = x.shape
        return halos

    @staticmethod
    def backward(ctx, d_halos):
        width, rank, size = ctx.width, ctx.rank, ctx.size
        dx = d_halos.new_zeros(ctx.x_shape)
        sends = [] if rank == 0 else [(d_halos.contiguous(), rank - 1, TAG_HALO_GRAD)]
        recvs = [] if rank == size - 1 else [((tuple(d_halos.shape), d_halos.dtype), rank + 1, TAG_HALO_GRAD)]
        if sends or recvs:
            got = comm.exchange(sends, recvs, group=ctx.group, device=d_halos.device,
                                describe=f"halo backward on rank {rank}").wait()
            if recvs:  # the gradients of the tokens this rank sent: each sequence's last width tokens
                for j, (_, b) in enumerate(ctx.segments):
                    dx[:, b - width:b] = got[0][:, j * width:(j + 1) * width]
        return dx, None, None, None, None, None


def halo_exchange(x: torch.Tensor, width: int, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Prepend the ``width`` tokens before this rank's shard (from rank r - 1; zeros on rank 0). Differentiable.

    Args:
        x: (B, S_local, ...) this rank's contiguous shard. Either every rank holds >= ``width`` tokens (one
            exchange) or every rank holds fewer (equal shards of a short sequence: a chain of P - 1 hops).
        width: tokens of left context (w - 1 for a conv of kernel width w); 0 returns x.

    Returns:
        (B, width + S_local, ...), x's dtype and device.

    Raises:
        ValueError: ``x`` not a tensor of >= 2 dims, ``width`` not an int >= 0, or, on every rank, ranks that
            disagree on width, dtype, trailing shape or whether their shard is shorter than ``width``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x: expected a tensor (B, S_local, ...), got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"width: must be an int >= 0 (the conv's kernel width - 1), got {width!r}")
    group, rank, size = comm.group_info(group)
    chained = x.shape[1] < width
    comm.check_agreement("halo_exchange", {"width": width, "dtype": x.dtype, "shape": (x.shape[0], "S", *x.shape[2:]),
                                           "shard shorter than width": chained}, group=group)
    if width == 0:
        return x
    return _Halo.apply(x, width, group, rank, size, chained)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv1d over the whole sequence, from this rank's shard (no activation).

    Equal, on every rank's tokens, to ``F.conv1d(x_full.mT, weight[:, None], bias, padding=w - 1,
    groups=C)[..., :S].mT`` on the unsharded sequence (transformers' ``causal_conv1d_fn`` before its activation).

    Args:
        x: (B, S_local, C) this rank's contiguous shard. weight: (C, w). bias: None or (C,).
        cu_seqlens: a packed batch (B = 1): int32 local boundaries of N sequences, each cut in P equal parts;
            each sequence's conv starts from zeros. One exchange each way carries every sequence's halo when
            every local piece holds >= w - 1 tokens (else one halo exchange per sequence).

    Returns:
        (B, S_local, C) in x's dtype. Weight and bias get this rank's partial gradient (sum over ranks = the
        full one, what a gradient all-reduce does).

    Raises:
        ValueError: shapes that do not fit, or see ``halo_exchange``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected (B, S_local, C), got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"weight: expected (C, w) = ({x.shape[2]}, w), got {getattr(weight, 'shape', weight)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (x.shape[2],)):
        raise ValueError(f"bias: expected None or (C,) = ({x.shape[2]},), got {getattr(bias, 'shape', bias)}")
    width = weight.shape[1] - 1

    def conv(padded: torch.Tensor) -> torch.Tensor:  # (B, w - 1 + n, C) -> (B, n, C)
        return F.conv1d(padded.mT.to(weight.dtype), weight[:, None], bias, groups=x.shape[2]).mT.to(x.dtype)

    if cu_seqlens is None:
        return conv(halo_exchange(x, width, group=group))
    if x.shape[0] != 1:
        raise ValueError(f"x: a packed batch (cu_seqlens) has batch size 1, got {x.shape[0]}")
    bounds = validate_cu_seqlens(cu_seqlens, x.shape[1])
    segments = tuple(zip(bounds, bounds[1:]))
    if width == 0 or min(b - a for a, b in segments) < width:
        return torch.cat([conv(halo_exchange(x[:, a:b], width, group=group)) for a, b in segments], 1)
    group, rank, size = comm.group_info(group)
    comm.check_agreement("causal_conv1d", {"width": width, "dtype": x.dtype, "channels": x.shape[2],
                                           "sequences": len(segments)}, group=group)
    halos = _SegmentHalos.apply(x, width, segments, group, rank, size)
    return torch.cat([conv(torch.cat([halos[:, j * width:(j + 1) * width], x[:, a:b]], 1))
                      for j, (a, b) in enumerate(segments)], 1)
