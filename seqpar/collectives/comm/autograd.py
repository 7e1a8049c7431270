"""Differentiable collectives: their adjoints are collectives too."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from seqpar.collectives.comm.transport import all_gather, all_to_all, reduce_scatter

__all__ = ["all_gather_differentiable", "all_to_all_differentiable"]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        ctx.group = group
        return all_gather(tensor, group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank used the gathered copy, so the gradient of a shard is the sum of all ranks' gradients for it.
        return reduce_scatter(grad.contiguous(), group=ctx.group).squeeze(0), None


def all_gather_differentiable(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``all_gather`` whose backward reduce-scatters the gradient (stacked on a new dim 0)."""
    return _AllGather.apply(tensor, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, output_shapes, *inputs: torch.Tensor):
        ctx.group = group
        ctx.input_shapes = [t.shape for t in inputs]
        outputs = all_to_all(list(inputs), group=group, output_shapes=output_shapes)
        ctx.output_shapes = [t.shape for t in outputs]
        ctx.dtype, ctx.device = inputs[0].dtype, inputs[0].device
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        grads = [torch.zeros(s, dtype=ctx.dtype, device=ctx.device) if g is None else g
                 for g, s in zip(grads, ctx.output_shapes)]
        return (None, None, *all_to_all(grads, group=ctx.group, output_shapes=ctx.input_shapes))


def all_to_all_differentiable(
    inputs: Sequence[torch.Tensor],
    *,
    group: dist.ProcessGroup | None = None,
    output_shapes: Sequence[torch.Size | tuple[int, ...]] | None = None,
) -> list[torch.Tensor]:
    """``all_to_all`` whose backward is the reverse all-to-all."""
    return list(_AllToAll.apply(group, output_shapes, *inputs))
