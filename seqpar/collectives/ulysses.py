"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence-sharded to head-sharded and back.

Forward: q, k, v go through one all-to-all each, from (tokens/P, all heads) to (all tokens, heads/P); the
tokens are put back in global order (the shards follow ``layout``), every rank runs ordinary attention on its
heads over the whole sequence with the full causal mask, and one all-to-all brings the output back to
(tokens/P, all heads). The backward is the adjoint: four all-to-alls in reverse (dout, then dq, dk, dv).

GQA: rank j needs the K/V heads its query heads read. When H_kv >= P and P divides H_kv that is an even split;
otherwise (e.g. H_kv < P) a K/V head is sent to every rank whose query heads use it, which replicates each head
as little as needed.

Three all-to-alls forward (K and V travel in one: each piece holds its K heads, then its V heads) and four
backward (dK and dV go as the kernel wrote them, two messages, where one would need a packing copy of both).
Bytes sent by rank r (T: local tokens, b: element size, n_j: K/V heads rank j needs; with a value head dim
Dv != D, the k, v terms carry (D + Dv) instead of 2 * D):

    forward  = (P-1)/P * T*H*D*b (q)  +  2 * sum_{j != r} T*n_j*D*b (k, v)  +  (P-1)/P * T*H*D*b (out)
    backward = (P-1)/P * T*H*D*b (dout)  +  (P-1) * 2*T*n_r*D*b (dk, dv of the heads r received)
               +  (P-1)/P * T*H*D*b (dq)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.softmax_common import prepare_softmax_sp
from seqpar.kernels.attention import attention

__all__ = ["ulysses_attention", "ulysses_kv_heads"]


def ulysses_kv_heads(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> list[int]:
    """The K/V heads that the query heads of ``rank`` read (query heads are split in P equal ranges)."""
    per_rank = num_heads // world_size
    group = num_heads // num_kv_heads
    return sorted({h // group for h in range(rank * per_rank, (rank + 1) * per_rank)})


def ulysses_attention(
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
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-parallel softmax attention by all-to-all head exchange (DeepSpeed-Ulysses). Differentiable.

    Same arguments, shapes and result as ``seqpar.ring_attention`` (``window``, ``softcap``, ``sinks`` and a
    value head dim != D included). After the all-to-all every rank holds whole sequences in global order, so
    the kernel gets the window as it is (no positions: flash-attn can run it); each rank adds the sinks of the
    query heads it holds.

    Raises:
        ValueError: as ``ring_attention``; also when the number of query heads is not divisible by the group
            size (Ulysses splits heads across ranks: use ``ring_attention`` or ``token_ring_attention`` there).
    """
    sp = prepare_softmax_sp(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, cu_seqlens=cu_seqlens,
        op="ulysses_attention",
        backend=backend, max_seqlen=max_seqlen, window=window, softcap=softcap, sinks=sinks, positions=False,
    )
    p, h, h_kv = sp.world_size, sp.q.shape[1], sp.k.shape[1]
    if h % p:
        raise ValueError(
            f"q: Ulysses splits the {h} query heads across {p} ranks, which needs H % P == 0; "
            "use ring_attention (or token_ring_attention) for this group size"
        )
    per_rank = h // p
    cu = sp.global_cu_seqlens()
    hint = None if sp.max_seqlen is None else sp.max_seqlen * p  # every sequence gathered whole: P times longer
    my_sinks = None if sp.sinks is None else sp.sinks[sp.rank * per_rank:(sp.rank + 1) * per_rank]
    order, inverse = _global_order(sp)
    if h_kv % p == 0:  # every rank reads its own H_kv / P K/V heads: one permuting copy each way (_SeqToHeads)
        (q_full,) = _SeqToHeads.apply(sp.group, order, inverse, sp.q)  # (T*P, H/P, D)
        k_full, v_full = _SeqToHeads.apply(sp.group, order, inverse, sp.k, sp.v)  # K and V in one all-to-all
        out_full = attention(
            q_full, k_full, v_full, causal=sp.causal, scale=sp.scale, backend=backend, cu_seqlens_q=cu,
            cu_seqlens_k=cu, max_seqlen_q=hint, max_seqlen_k=hint, window=sp.window, softcap=sp.softcap,
            sinks=my_sinks,
        )
        del q_full, k_full, v_full
        return sp.unpack(_HeadsToSeq.apply(sp.group, order, inverse, out_full))
    return sp.unpack(_replicated_kv_heads(sp, backend, order, inverse, cu, hint, my_sinks))


def _replicated_kv_heads(sp, backend, order, inverse, cu, hint, my_sinks) -> torch.Tensor:
    """GQA with H_kv % P != 0: K/V heads go to every rank whose query heads read them (module docstring)."""
    p, h, h_kv = sp.world_size, sp.q.shape[1], sp.k.shape[1]
    per_rank = h // p
    needed = [ulysses_kv_heads(h, h_kv, p, j) for j in range(p)]
    mine = needed[sp.rank]
    tokens = sp.q.shape[0]

    # Each intermediate is dropped as soon as the next one exists, so only one copy of q / K,V / out is alive at
    # a time (the peak of this op is the forward's gathered q, K, V next to their send and receive buffers).
    q_full = _in_global_order(
        comm.all_to_all_differentiable(list(sp.q.split(per_rank, dim=1)), group=sp.group), inverse
    )  # (T*P, H/P, D)
    # K and V in one all-to-all: rank j's piece is (T, n_j * (D + Dv)), its K heads then its V heads, so each
    # received K / V head block is contiguous (a view of the message, as the kernels want it); Dv may differ
    d, dv, n = sp.k.shape[-1], sp.v.shape[-1], len(mine)
    kv_pieces = [torch.cat([_heads(sp.k, needed[j]).flatten(1), _heads(sp.v, needed[j]).flatten(1)], dim=1)
                 for j in range(p)]
    kv_full = _in_global_order(comm.all_to_all_differentiable(
        kv_pieces, group=sp.group, output_shapes=[(tokens, n * (d + dv))] * p,
    ), inverse)
    del kv_pieces
    k_full, v_full = kv_full[:, :n * d].unflatten(1, (n, d)), kv_full[:, n * d:].unflatten(1, (n, dv))
    del kv_full

    # Map each local query head to its K/V head; use the kernel's GQA when the mapping is regular.
    group_size = h // h_kv
    kv_of_q = [(sp.rank * per_rank + t) // group_size - mine[0] for t in range(per_rank)]
    ratio = per_rank // len(mine) if per_rank % len(mine) == 0 else 0
    if not ratio or kv_of_q != [t // ratio for t in range(per_rank)]:
        index = torch.tensor(kv_of_q, device=sp.q.device)
        k_full, v_full = k_full[:, index], v_full[:, index]

    out_full = attention(
        q_full, k_full, v_full, causal=sp.causal, scale=sp.scale, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu,
        max_seqlen_q=hint, max_seqlen_k=hint, window=sp.window, softcap=sp.softcap, sinks=my_sinks,
    )
    out_parts = list((out_full if order is None else out_full[order]).split(tokens, dim=0))  # rank-major pieces
    del out_full
    return torch.cat(comm.all_to_all_differentiable(out_parts, group=sp.group), dim=1)


# ----------------------------------------------------------------------------------------------------
# Sequence shards <-> head shards, one permuting copy each way (H_kv % P == 0)
# ----------------------------------------------------------------------------------------------------
#
# A rank's (T, H_x, D_x) shard is sent as one (P, T, sum_x H_x/P * D_x) buffer: piece j holds, for each tensor x,
# the heads of rank j, written there by one strided copy (the permute); what arrives is rank-major, (P*T, ...),
# which is the global token order for the contiguous layout with one sequence and is reordered by one index
# otherwise. Back: each (P*T, H_x/P, D_x) result goes in its own message, sent as it is when it is contiguous and
# in rank-major order (the kernel's output and gradients are), else reordered by one index copy; one permuting
# copy after the transfer. DeepSpeed-Ulysses and yunchang make the same one copy per tensor each way (8 shard-sized
# copies per forward+backward); K and V share the forward message here (one collective fewer, no extra copy).


def _seq_to_heads(shards, group, inverse: torch.Tensor | None) -> list[torch.Tensor]:
    """(T, H_x, D_x) shards -> (P*T, H_x/P, D_x) whole sequences (views of one received buffer), one all-to-all."""
    p = dist.get_world_size(group)
    tokens = shards[0].shape[0]
    widths = [t.shape[1] // p * t.shape[2] for t in shards]
    send = shards[0].new_empty((p, tokens, sum(widths)))
    offset = 0
    for t, width in zip(shards, widths):  # the permute: piece j gets heads [j H_x/P, (j+1) H_x/P) of every token
        send[:, :, offset:offset + width].unflatten(2, (t.shape[1] // p, t.shape[2])).copy_(
            t.unflatten(1, (p, t.shape[1] // p)).transpose(0, 1))
        offset += width
    received = comm.all_to_all_single(send, group=group).view(p * tokens, -1)
    del send  # released now: all_to_all_single returns once gloo let go of it
    if inverse is not None:
        received = received[inverse]
    fulls, offset = [], 0
    for t, width in zip(shards, widths):
        fulls.append(received[:, offset:offset + width].unflatten(1, (t.shape[1] // p, t.shape[2])))
        offset += width
    return fulls


def _heads_to_seq(full: torch.Tensor, group, order: torch.Tensor | None, shape) -> torch.Tensor:
    """The adjoint of ``_seq_to_heads`` for one tensor: (P*T, H_x/P, D_x) -> this rank's (T, H_x, D_x) shard.

    One copy on each side at most: the send buffer is the tensor itself when it is dense and rank-major (the
    kernel's output and gradients are), else the one copy that puts it there (``full[order]`` writes rank-major
    order directly); after the transfer the inverse permute writes the shard."""
    p = dist.get_world_size(group)
    tokens, heads, dim = shape
    if order is not None:
        send = full[order]
    else:
        send = full if full.is_contiguous() else full.contiguous()
    received = comm.all_to_all_single(send.view(p, tokens, heads // p * dim), group=group)
    del send
    # piece j holds rank j's heads of our tokens: the inverse permute
    return received.unflatten(2, (heads // p, dim)).transpose(0, 1).reshape(shape)


class _SeqToHeads(torch.autograd.Function):
    """Differentiable ``_seq_to_heads`` of one or more shards (one all-to-all forward, one per gradient back)."""

    @staticmethod
    def forward(ctx, group, order, inverse, *shards):
        ctx.group, ctx.order, ctx.shapes = group, order, [t.shape for t in shards]
        fulls = _seq_to_heads(shards, group, inverse)
        ctx.full_shapes = [f.shape for f in fulls]
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        # one all-to-all per gradient (dK and dV separately): each goes out as the kernel wrote it, where packing
        # them into one message would copy both (two shard-sized copies for one collective fewer)
        return (None, None, None, *(
            _heads_to_seq(like.new_zeros(full_shape) if g is None else g, ctx.group, ctx.order, shape)
            for g, full_shape, shape in zip(grads, ctx.full_shapes, ctx.shapes)))


class _HeadsToSeq(torch.autograd.Function):
    """Differentiable ``_heads_to_seq`` of one (P*T, H/P, Dv) result back to this rank's (T, H, Dv) shard."""

    @staticmethod
    def forward(ctx, group, order, inverse, full):
        p = dist.get_world_size(group)
        ctx.group, ctx.inverse = group, inverse
        shape = (full.shape[0] // p, full.shape[1] * p, full.shape[2])
        return _heads_to_seq(full, group, order, shape)

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, _seq_to_heads([grad], ctx.group, ctx.inverse)[0]


def _global_order(sp) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``sp.rank_major_order()``, or ``(None, None)`` where rank-major order already is the global order: the
    contiguous layout with one sequence (padded input of batch 1), where the reorderings would be copies."""
    if sp.layout == "contiguous" and sp.padded_shape is not None and sp.padded_shape[0] == 1:
        return None, None
    return sp.rank_major_order()


def _in_global_order(parts: list[torch.Tensor], inverse: torch.Tensor | None) -> torch.Tensor:
    """The all-to-all's pieces (rank-major) joined and put in global token order."""
    joined = torch.cat(parts, 0)
    return joined if inverse is None else joined[inverse]


def _heads(t: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``t[:, heads]`` of a (T, H, D) tensor; a view when the heads are consecutive (they are unless GQA
    replicates K/V heads)."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return t[:, heads[0]:heads[-1] + 1]
    return t[:, heads]
