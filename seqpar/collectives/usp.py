"""USP attention (arXiv 2405.07719): Ulysses all-to-all inside groups of consecutive ranks x ring across them.

The P ranks of ``group`` form r = P / u inner groups of u = ``ulysses_degree`` CONSECUTIVE ranks; rank g*u + i
is inner rank i of inner group g, and the outer group of that rank is {i, u + i, 2u + i, ...} (of size r, where
it is outer rank g).

Token placement is the 1-D ops' at the same world size: with ``layout="zigzag"`` rank g*u + i holds zigzag
chunks g*u + i and 2P-1-g*u-i of every sequence, exactly what ``ring_attention`` would hold, so the shards need
no re-layout when a model switches strategy. After the inner all-to-all (sequence-sharded -> head-sharded) the
tokens of inner group g are chunks {g*u .. g*u+u-1} and {2P-u-g*u .. 2P-1-g*u}: the zigzag shard of outer rank
g on a ring of r ranks cut into 2r super-chunks (contiguous: the contiguous shard of outer rank g). So:

1. inner all-to-all of q, and one of K and V together, like ``ulysses_attention`` on the inner group: every
   rank receives H/u query heads and the K/V heads they read (``ulysses_kv_heads``) of all u * T tokens;
2. the received tokens are gathered into the outer ring's local order (per sequence for packed batches), one
   ``index_select`` per tensor into dense tensors (the ring sends K/V as they are at every step); with one
   sequence in the contiguous layout the all-to-all already delivers that order and q needs no gather;
3. ring attention over the outer group on those heads (``ring.py``'s forward/backward schedules, run on a view
   derived from this call's checked arguments: no second check or agreement collective, and padded input stays
   padded, so the zigzag halves are views): its transfer/compute overlap, the skipping of masked blocks, the
   zigzag balance and its backward come with it;
4. the output is gathered back into rank-major order (the send buffer) and one all-to-all and one permuting
   copy bring it back to (T, all heads).

Each tensor is copied twice each way (the permute into the send buffer, the gather into ring order), as
yunchang's ``SeqAllToAll4D`` does; the gathered tensors reuse the send buffer's memory once the all-to-all has
returned, so a step allocates a send and a receive buffer per tensor and nothing more
(tests/test_usp.py counts the moves; bench/peers.py compares with yunchang's ``LongContextAttention``).
The backward is the adjoint: the same all-to-alls reversed around ring's own backward schedule.
``ulysses_degree=1`` is ``ring_attention`` and ``ulysses_degree=P`` is ``ulysses_attention`` (the same contract,
and the formula below with u = 1 or r = 1); they run as those ops.

GQA: when the query heads of inner rank i read their K/V heads in a regular pattern (query head t of the rank's
H/u uses local K/V head t // (H/u / n_i)), the ring carries the n_i = len(ulysses_kv_heads(H, H_kv, u, i))
heads; otherwise (e.g. H=6, H_kv=3, u=2) the K/V heads are expanded to one per query head first and the ring
carries m_i = H/u of them. Write m_i for what the ring carries (n_i in the regular case).

Bytes sent by rank g*u + i (T: its local tokens, all sequences together; b: element size of the inputs; a: the
accumulation element size, 4, or 8 for float64 inputs):

    forward  = (u-1)/u * T*H*D*b (q)  +  2 * sum_{j != i} T*n_j*D*b (k, v)  +  (u-1)/u * T*H*D*b (out)
               +  (r-1) * 2 * (u*T) * m_i * D * b                                         (ring: K and V)
    backward = (u-1)/u * T*H*D*b (dout)  +  (u-1) * 2*T*n_i*D*b (dk, dv)  +  (u-1)/u * T*H*D*b (dq)
               +  (r-1) * 2 * (u*T) * m_i * D * (b + a)                 (ring: K and V, then dK/dV accumulators)

i.e. the Ulysses volume on the inner group (P = u) plus the ring volume on the outer group (P = r, local tokens
u*T, m_i K/V heads); with a value head dim Dv != D, 2 * D in the K/V terms is D + Dv.
With a ``window`` the inner all-to-alls send the same (they move every token); the ring across the inner groups
is ``ring_attention`` with the window on its r shards of u*T tokens, so it sends only to the outer ranks whose
queries meet (ring.py: (r-1) becomes n_out(g) forward, n_out(g) K/V + n_in(g) dK/dV backward, counted on the
outer ring's shards) and has only the steps its window needs.
``seqpar.strategies.get("usp").comm_bytes`` gives the busiest rank's share (with a window: the ring part's mean
over the outer ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.groups import split_consecutive
from seqpar.collectives.ring import _ring_backward, _ring_forward, ring_attention
from seqpar.collectives.softmax_common import SoftmaxSP, prepare_softmax_sp, run_scheduled, shard_positions
from seqpar.collectives.ulysses import ulysses_attention, ulysses_kv_heads
from seqpar.strategies import usp_ulysses_degree

__all__ = ["usp_attention"]


def _check_ulysses_degree(ulysses_degree: int | None, world_size: int, num_heads: int) -> int:
    """The Ulysses degree to use (the registry's default rule for None). Local and identical on every rank."""
    if ulysses_degree is None:
        return usp_ulysses_degree(world_size, num_heads)
    allowed = [d for d in range(1, world_size + 1) if world_size % d == 0 and num_heads % d == 0]
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1:
        raise ValueError(
            f"ulysses_degree: expected a positive int or None, got {ulysses_degree!r}; use one of {allowed}"
        )
    if world_size % ulysses_degree:
        raise ValueError(
            f"ulysses_degree: {ulysses_degree} does not divide the group size {world_size} (inner groups are "
            f"{ulysses_degree} consecutive ranks); use one of {allowed}, or None for the default"
        )
    if num_heads % ulysses_degree:
        raise ValueError(
            f"ulysses_degree: the inner all-to-all splits the {num_heads} query heads over {ulysses_degree} ranks, "
            f"which needs H % ulysses_degree == 0; use one of {allowed}, or None for the default"
        )
    return ulysses_degree


def _ring_order(sp: SoftmaxSP, inner_size: int, outer_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_ring, from_ring)``: ``received[to_ring]`` puts the tokens an inner all-to-all delivers (inner rank
    0's shard, then inner rank 1's, ...) in the local order of outer rank ``outer_rank``'s shard on a ring of
    P / u ranks with the same layout; ``ring_local[from_ring]`` undoes it."""
    world_size = sp.world_size
    global_cu = sp.global_cu_seqlens()
    total = sp.q.shape[0] * world_size  # from the shapes: nothing of cu_seqlens is read on the host
    first = outer_rank * inner_size
    received = torch.cat(
        [shard_positions(global_cu, total, world_size, first + j, sp.layout) for j in range(inner_size)]
    )
    wanted = shard_positions(global_cu, total, world_size // inner_size, outer_rank, sp.layout)
    position = torch.full((total,), -1, dtype=torch.long, device=global_cu.device)  # each token's slot in `received`
    position[received] = torch.arange(received.numel(), device=global_cu.device)
    to_ring = position[wanted]
    from_ring = torch.empty_like(to_ring)
    from_ring[to_ring] = torch.arange(to_ring.numel(), device=global_cu.device)
    return to_ring, from_ring


# (batch, local length, P, u, outer rank, layout, device) -> (to_ring, from_ring) of padded input: the same every
# step of a training run, so the ~30 small index ops of _ring_order run once per shape, not once per layer call
_padded_orders: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}


def _ring_orders(sp: SoftmaxSP, inner_size: int, outer_rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``_ring_order``, cached for padded input; ``(None, None)`` where the order the all-to-all delivers already
    is the ring's (contiguous layout, one sequence: inner rank j's shard is chunk j of the outer shard)."""
    if sp.padded_shape is None:
        return _ring_order(sp, inner_size, outer_rank)
    if sp.layout == "contiguous" and sp.padded_shape[0] == 1:
        return None, None
    key = (*sp.padded_shape, sp.world_size, inner_size, outer_rank, sp.layout, str(sp.q.device))
    if key not in _padded_orders:
        if len(_padded_orders) >= 64:  # shapes of a run are few; never let a sweep grow it without bound
            _padded_orders.clear()
        _padded_orders[key] = _ring_order(sp, inner_size, outer_rank)
    return _padded_orders[key]


# ----------------------------------------------------------------------------------------------------
# Sequence shards <-> the ring's head shards over the inner group: one all-to-all and two copies each way
# ----------------------------------------------------------------------------------------------------
#
# Out: the (T, H_x, D_x) shards are written into one (u, T, sum_x H_x/u * D_x) send buffer (piece j: inner rank
# j's heads of every token, the permute), and what arrives, rank-major, is gathered row by row into each ring
# tensor in the ring's token order (one index_select per tensor, which also makes it contiguous, so the ring
# sends it as it is at every step). Back: the ring tensors are scattered into the send buffer in rank-major order
# (index_select or index_copy_) and the received pieces are permuted into (T, H_x, D_x). yunchang's
# SeqAllToAll4D makes the same two copies per tensor; K and V share one all-to-all here.


def _seq_to_ring(shards, group, inner_size: int, to_ring: torch.Tensor | None) -> list[torch.Tensor]:
    """(T, H_x, D_x) shards -> (u*T, H_x/u, D_x) contiguous tensors in the ring's token order."""
    u, tokens = inner_size, shards[0].shape[0]
    widths = [t.shape[1] // u * t.shape[2] for t in shards]
    send = shards[0].new_empty((u, tokens, sum(widths)))
    offset = 0
    for t, width in zip(shards, widths):  # the permute: piece j gets heads [j H_x/u, (j+1) H_x/u) of every token
        send[:, :, offset:offset + width].view(u, tokens, t.shape[1] // u, t.shape[2]).copy_(
            t.unflatten(1, (u, t.shape[1] // u)).transpose(0, 1))
        offset += width
    received = comm.all_to_all_single(send, group=group).view(u * tokens, -1)
    if to_ring is None and len(shards) == 1:  # already in ring order and dense
        return [received.view(u * tokens, shards[0].shape[1] // u, shards[0].shape[2])]
    # the ring tensors are gathered into the send buffer's memory, which gloo has let go of and which holds
    # exactly as many elements: no third buffer per step (allocations are page faults on a CPU)
    memory, rings, offset = send.view(-1), [], 0
    for t, width in zip(shards, widths):
        ring = memory[offset * u * tokens:(offset + width) * u * tokens].view(u * tokens, width)
        columns = received[:, offset:offset + width]
        if to_ring is None:
            ring.copy_(columns)
        else:
            torch.index_select(columns, 0, to_ring, out=ring)
        rings.append(ring.view(u * tokens, t.shape[1] // u, t.shape[2]))
        offset += width
    return rings


def _ring_to_seq(rings, group, inner_size: int, to_ring: torch.Tensor | None, from_ring: torch.Tensor | None,
                 ) -> list[torch.Tensor]:
    """The adjoint of ``_seq_to_ring``: (u*T, H_x/u, D_x) in ring order -> (T, H_x, D_x)."""
    u, rows = inner_size, rings[0].shape[0]
    tokens = rows // u
    widths = [t.shape[1] * t.shape[2] for t in rings]
    flats = [t.reshape(rows, width) for t, width in zip(rings, widths)]
    if len(rings) == 1 and from_ring is None and flats[0].is_contiguous():
        send, fresh = flats[0], False  # already rank-major and dense: sent as it is (the caller's tensor)
    elif len(rings) == 1:  # the gather into rank-major order is the send buffer itself
        send, fresh = flats[0].contiguous() if from_ring is None else flats[0].index_select(0, from_ring), True
    else:
        send, fresh = rings[0].new_empty((rows, sum(widths))), True
        offset = 0
        for flat, width in zip(flats, widths):
            if to_ring is None:
                send[:, offset:offset + width].copy_(flat)
            else:
                send[:, offset:offset + width].index_copy_(0, to_ring, flat)
            offset += width
    received = comm.all_to_all_single(send.view(u, tokens, -1), group=group)
    del flats
    # the shards go into the send buffer's memory when it is ours (see _seq_to_ring), else into new tensors
    memory, shards, offset = send.view(-1) if fresh else None, [], 0
    for t, width in zip(rings, widths):  # piece j holds inner rank j's heads of our tokens: the inverse permute
        shape = (tokens, u * t.shape[1], t.shape[2])
        shard = (t.new_empty(shape) if memory is None
                 else memory[offset * rows:(offset + width) * rows].view(shape))
        piece = received[:, :, offset:offset + width].view(u, tokens, t.shape[1], t.shape[2])
        shard.view(tokens, u, t.shape[1], t.shape[2]).copy_(piece.transpose(0, 1))
        shards.append(shard)
        offset += width
    return shards


class _SeqToRing(torch.autograd.Function):
    """Differentiable ``_seq_to_ring`` of one or more shards (one all-to-all each way)."""

    @staticmethod
    def forward(ctx, group, inner_size, to_ring, from_ring, *shards):
        ctx.group, ctx.inner_size, ctx.to_ring, ctx.from_ring = group, inner_size, to_ring, from_ring
        rings = _seq_to_ring(shards, group, inner_size, to_ring)
        ctx.ring_shapes = [t.shape for t in rings]
        return tuple(rings)

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        grads = [like.new_zeros(s) if g is None else g for g, s in zip(grads, ctx.ring_shapes)]
        return (None, None, None, None, *_ring_to_seq(grads, ctx.group, ctx.inner_size, ctx.to_ring, ctx.from_ring))


class _RingToSeq(torch.autograd.Function):
    """Differentiable ``_ring_to_seq`` of the ring's output (one all-to-all each way)."""

    @staticmethod
    def forward(ctx, group, inner_size, to_ring, from_ring, ring):
        ctx.group, ctx.inner_size, ctx.to_ring = group, inner_size, to_ring
        return _ring_to_seq([ring], group, inner_size, to_ring, from_ring)[0]

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, None, _seq_to_ring([grad], ctx.group, ctx.inner_size, ctx.to_ring)[0]


def _outer_sp(sp: SoftmaxSP, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, outer: dist.ProcessGroup,
              inner_size: int, outer_rank: int, sinks: torch.Tensor | None) -> SoftmaxSP:
    """The ring's ``SoftmaxSP`` over the outer group, derived from the checked call (``prepare_softmax_sp`` ran on
    the whole group, every rank agreeing, so neither the checks nor the agreement collective run again): u local
    shards' tokens of every sequence, the heads this rank holds after the inner all-to-all."""
    u = inner_size
    return SoftmaxSP(
        q=q, k=k, v=v, cu_seqlens=(sp.cu_seqlens.long() * u).to(torch.int32),
        max_seqlen=None if sp.max_seqlen is None else sp.max_seqlen * u,
        group=outer, rank=outer_rank, world_size=sp.world_size // u, layout=sp.layout, causal=sp.causal,
        scale=sp.scale, padded_shape=None if sp.padded_shape is None else (sp.padded_shape[0], sp.padded_shape[1] * u),
        window=sp.window, softcap=sp.softcap, sinks=sinks,
        local_lengths=None if sp.local_lengths is None else tuple(n * u for n in sp.local_lengths),
    )


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    ulysses_degree: int | None = None,
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
    """Sequence-parallel softmax attention in two dimensions: Ulysses inside groups of ``ulysses_degree``
    consecutive ranks, ring attention across them (USP). Differentiable.

    Same arguments, shapes, token placement and result as ``seqpar.ring_attention``, plus:

    Args:
        ulysses_degree: u, the size of the inner (Ulysses) groups; must divide the group size P and the number
            of query heads H. Default (None): ``seqpar.strategies.usp_ulysses_degree(P, H)``, the largest such
            u below P (so the ring has at least 2 ranks), 1 when there is none. u = 1 runs ``ring_attention``,
            u = P runs ``ulysses_attention``.
        window, softcap, sinks: as ``ring_attention``; the ring across the inner groups gets the window (its
            shards are whole zigzag/contiguous shards of the outer ring, so it skips what the window hides) and
            the sinks of the query heads this rank holds after the inner all-to-all. A value head dim != D
            travels with K in the inner all-to-all and in the ring.

    Raises:
        ValueError: as ``ring_attention``; also when ``ulysses_degree`` is not a positive int dividing both P
            and H. On every rank, before any communication.
    """
    sp = prepare_softmax_sp(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, cu_seqlens=cu_seqlens,
        op="usp_attention",
        backend=backend, agree={"ulysses_degree": ulysses_degree}, max_seqlen=max_seqlen, window=window,
        softcap=softcap, sinks=sinks,
    )
    p, h, h_kv = sp.world_size, sp.q.shape[1], sp.k.shape[1]
    u = _check_ulysses_degree(ulysses_degree, p, h)
    options = {
        "causal": causal, "softmax_scale": softmax_scale, "layout": layout, "cu_seqlens": cu_seqlens,
        "backend": backend, "max_seqlen": max_seqlen, "window": window, "softcap": softcap, "sinks": sinks,
    }
    if u == 1:
        return ring_attention(q, k, v, group=sp.group, **options)
    if u == p:
        return ulysses_attention(q, k, v, group=sp.group, **options)

    inner, outer = split_consecutive(sp.group, u)
    g, i = divmod(sp.rank, u)
    per_rank = h // u
    to_ring, from_ring = _ring_orders(sp, u, g)

    # 1. sequence-sharded -> head-sharded over the inner group, 2. in the outer ring's local order (one
    # all-to-all for q, one for K and V together)
    (q_ring,) = _SeqToRing.apply(inner, u, to_ring, from_ring, sp.q)  # (u*T, H/u, D)
    if h_kv % u == 0:  # every inner rank reads its own H_kv / u K/V heads
        k_ring, v_ring = _SeqToRing.apply(inner, u, to_ring, from_ring, sp.k, sp.v)
    else:
        k_ring, v_ring = _replicated_kv_to_ring(sp, inner, u, i, to_ring)

    # 3. ring attention across the inner groups on these heads (its forward/backward schedules, run directly)
    my_sinks = None if sp.sinks is None else sp.sinks[i * per_rank:(i + 1) * per_rank]
    ring_sp = _outer_sp(sp, q_ring, k_ring, v_ring, outer, u, g, my_sinks)
    if ring_sp.padded_shape is not None:  # padded input: the ring's gradients come back (B, u*S, ...)-shaped
        q_ring, k_ring, v_ring = (ring_sp.unpack(t) for t in (q_ring, k_ring, v_ring))
    out_ring = run_scheduled(q_ring, k_ring, v_ring, ring_sp, backend, _ring_forward, _ring_backward)
    # 4. back to this rank's tokens with all heads
    out_ring = out_ring.view(-1, *out_ring.shape[-2:])
    return sp.unpack(_RingToSeq.apply(inner, u, to_ring, from_ring, out_ring))


def _replicated_kv_to_ring(sp: SoftmaxSP, inner: dist.ProcessGroup, u: int, i: int, to_ring: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA with H_kv % u != 0: each inner rank gets the K/V heads its query heads read (``ulysses_kv_heads``, some
    sent to several ranks; the backward sums their gradients), in the ring's order, one per query head where the
    ring's kernels could not map them (module docstring)."""
    h, h_kv, d = sp.q.shape[1], sp.k.shape[1], sp.q.shape[2]
    per_rank, tokens = h // u, sp.q.shape[0]
    needed = [ulysses_kv_heads(h, h_kv, u, j) for j in range(u)]
    mine = needed[i]
    kv = torch.cat([sp.k, sp.v], dim=-1)  # (T, H_kv, D + Dv)
    kv_parts = comm.all_to_all_differentiable(
        [kv[:, needed[j]] for j in range(u)], group=inner, output_shapes=[(tokens, len(mine), kv.shape[-1])] * u
    )
    kv_ring = torch.cat(kv_parts, 0)
    if to_ring is not None:
        kv_ring = kv_ring[to_ring]  # (u*T, n_i, D + Dv)
    k_ring, v_ring = kv_ring[..., :d], kv_ring[..., d:]
    # The ring's kernels map query head t to K/V head t // (H/u / n_i); expand K/V when the heads don't fall so.
    group_size = h // h_kv
    kv_of_q = [(i * per_rank + t) // group_size - mine[0] for t in range(per_rank)]
    ratio = per_rank // len(mine) if per_rank % len(mine) == 0 else 0
    if not ratio or kv_of_q != [t // ratio for t in range(per_rank)]:
        index = torch.tensor(kv_of_q, device=sp.q.device)
        k_ring, v_ring = k_ring[:, index], v_ring[:, index]
    return k_ring.contiguous(), v_ring.contiguous()  # the ring sends them at every step: dense once, here
