"""Which tokens a rank holds: the ``contiguous`` and ``zigzag`` layouts, for padded and packed batches.

* ``contiguous``: the sequence is cut in P equal slices; rank r holds slice r.
* ``zigzag``: the sequence is cut in 2P equal chunks; rank r holds chunks r and 2P-1-r, in that order. With a
  causal mask every rank then does the same amount of work.

Packed variable-length batches (``cu_seqlens``: int32 cumulative lengths, tokens on dim 0) apply the layout to
each sequence separately, so every sequence length must be a multiple of P (contiguous) or 2P (zigzag);
``pad_for_layout`` pads to that multiple and says what it padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.distributed as dist

from seqpar.collectives import comm

# validate_cu_seqlens is re-exported here (in __all__): one check of packed boundaries for every layer.
from seqpar.kernels.varlen import validate_cu_seqlens

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")

__all__ = [
    "LAYOUTS",
    "Layout",
    "chunk_ranges",
    "PaddedSequence",
    "layout_multiple",
    "local_positions",
    "pad_for_layout",
    "shard_indices",
    "shard_sequence",
    "unshard_sequence",
    "validate_cu_seqlens",
]


def layout_multiple(layout: str, world_size: int) -> int:
    """The number every sequence length must divide by for ``layout`` over ``world_size`` ranks."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown layout {layout!r}; use one of {LAYOUTS}")
    return 2 * world_size if layout == "zigzag" else world_size


def chunk_ranges(seq_len: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """The [start, end) ranges of one sequence that ``rank`` holds, in local order."""
    multiple = layout_multiple(layout, world_size)
    if seq_len % multiple:
        raise ValueError(
            f"seq_len: {seq_len} is not divisible by {multiple} ({layout} layout over {world_size} ranks); "
            "pad it with seqpar.pad_for_layout"
        )
    if layout == "contiguous":
        piece = seq_len // world_size
        return [(rank * piece, (rank + 1) * piece)]
    chunk = seq_len // (2 * world_size)
    second = 2 * world_size - 1 - rank
    return [(rank * chunk, (rank + 1) * chunk), (second * chunk, (second + 1) * chunk)]


def shard_indices(
    seq_len: int, world_size: int, rank: int, *, layout: str = "zigzag", cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Global token indices held by ``rank``, in local order (int64).

    With ``cu_seqlens`` the indices point into the packed token dimension and ``seq_len`` must be its length.
    """
    bounds = [0, seq_len] if cu_seqlens is None else validate_cu_seqlens(cu_seqlens, seq_len)
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        for a, b in chunk_ranges(end - start, world_size, rank, layout):
            pieces.append(torch.arange(start + a, start + b, device="cpu"))
    return torch.cat(pieces)


def local_positions(
    seq_len: int,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global token indices this rank holds (into the packed token dim when ``cu_seqlens`` is given)."""
    _, rank, size = comm.group_info(group)
    return shard_indices(seq_len, size, rank, layout=layout, cu_seqlens=cu_seqlens)


def _local_cu_seqlens(cu_seqlens: torch.Tensor, world_size: int) -> torch.Tensor:
    # Every rank holds the same share (1/P) of every sequence.
    return (cu_seqlens // world_size).to(torch.int32)


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: {dim} is out of range for a tensor with {x.dim()} dims")
    return dim % x.dim()


@overload
def shard_sequence(
    x: torch.Tensor, *, group=..., dim: int | None = ..., layout: str = ..., cu_seqlens: None = ...
) -> torch.Tensor: ...
@overload
def shard_sequence(
    x: torch.Tensor, *, group=..., dim: int | None = ..., layout: str = ..., cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]: ...


def shard_sequence(
    x: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    dim: int | None = None,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
):
    """This rank's shard of the global tensor ``x`` along its sequence dim. No communication.

    Args:
        x: the global tensor, identical on every rank; (B, S, ...) padded or (T, ...) packed.
        dim: sequence dim; default 1, or 0 with ``cu_seqlens``.
        layout: ``"zigzag"`` or ``"contiguous"``.
        cu_seqlens: int32 cumulative lengths of the packed global batch.

    Returns:
        The local shard, or ``(local, local_cu_seqlens)`` with ``cu_seqlens``.

    Raises:
        ValueError: unknown layout, dim out of range, a length the layout cannot split, bad ``cu_seqlens``,
            or this rank not in ``group``.
    """
    _, rank, size = comm.group_info(group)
    dim = _check_dim(x, (0 if cu_seqlens is not None else 1) if dim is None else dim)
    index = shard_indices(x.shape[dim], size, rank, layout=layout, cu_seqlens=cu_seqlens).to(x.device)
    local = x.index_select(dim, index)
    if cu_seqlens is None:
        return local
    return local, _local_cu_seqlens(cu_seqlens, size)


class _Unshard(torch.autograd.Function):
    """Gather shards and restore global order; backward hands each rank the gradient of its own tokens
    summed over ranks (every rank used the gathered tensor)."""

    @staticmethod
    def forward(ctx, x_local, group, dim, inverse):
        ctx.group, ctx.dim, ctx.inverse = group, dim, inverse
        gathered = comm.all_gather(x_local.movedim(dim, 0), group=group)  # (P, S_local, ...)
        stacked = gathered.flatten(0, 1)  # rank-major order of global indices
        return stacked.index_select(0, inverse).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        g = grad.movedim(ctx.dim, 0)
        stacked = torch.empty_like(g)
        stacked[ctx.inverse] = g  # back to rank-major order
        mine = comm.reduce_scatter(stacked.contiguous(), group=ctx.group)
        return mine.movedim(0, ctx.dim), None, None, None


def unshard_sequence(
    x_local: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    dim: int | None = None,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of ``shard_sequence``: all-gather the shards and restore global token order. Differentiable.

    Args:
        x_local: this rank's shard.
        cu_seqlens: the GLOBAL int32 cumulative lengths (as passed to ``shard_sequence``) for packed batches.

    Raises:
        ValueError: as ``shard_sequence``.
    """
    group, rank, size = comm.group_info(group)
    dim = _check_dim(x_local, (0 if cu_seqlens is not None else 1) if dim is None else dim)
    total = x_local.shape[dim] * size
    order = torch.cat([shard_indices(total, size, r, layout=layout, cu_seqlens=cu_seqlens) for r in range(size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device="cpu")
    return _Unshard.apply(x_local, group, dim, inverse.to(x_local.device))


@dataclass
class PaddedSequence:
    """Result of ``pad_for_layout``.

    Attributes:
        tensor: the padded tensor.
        cu_seqlens: padded int32 cumulative lengths (packed input) or None.
        pad_lengths: tokens added to each sequence (packed) or to the sequence dim (padded input), a list.
        real_mask: bool tensor over the padded sequence dim, True for real tokens; index with it to drop padding.
    """

    tensor: torch.Tensor
    cu_seqlens: torch.Tensor | None
    pad_lengths: list[int]
    real_mask: torch.Tensor


def pad_for_layout(
    x: torch.Tensor,
    *,
    world_size: int,
    layout: str = "zigzag",
    dim: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    value: float = 0,
) -> PaddedSequence:
    """Pad each sequence at its end to the multiple that ``layout`` over ``world_size`` ranks needs.

    Raises:
        ValueError: unknown layout, world_size < 1, dim out of range, bad ``cu_seqlens``.
    """
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    multiple = layout_multiple(layout, world_size)
    dim = _check_dim(x, (0 if cu_seqlens is not None else 1) if dim is None else dim)
    bounds = [0, x.shape[dim]] if cu_seqlens is None else validate_cu_seqlens(cu_seqlens, x.shape[dim])
    pieces, masks, pads, new_bounds = [], [], [], [0]
    for start, end in zip(bounds, bounds[1:]):
        length = end - start
        pad = (-length) % multiple
        piece = x.narrow(dim, start, length)
        if pad:
            shape = list(piece.shape)
            shape[dim] = pad
            piece = torch.cat([piece, piece.new_full(shape, value)], dim)
        pieces.append(piece)
        masks.append(torch.cat([torch.ones(length, dtype=torch.bool, device="cpu"),
                                torch.zeros(pad, dtype=torch.bool, device="cpu")]))
        pads.append(pad)
        new_bounds.append(new_bounds[-1] + length + pad)
    padded_cu = None if cu_seqlens is None else torch.tensor(new_bounds, dtype=torch.int32, device="cpu")
    return PaddedSequence(torch.cat(pieces, dim), padded_cu, pads, torch.cat(masks).to(x.device))
