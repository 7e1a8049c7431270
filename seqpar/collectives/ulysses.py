"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence-sharded to head-sharded and back.

Forward: q, k, v go through one all-to-all each, from (tokens/P, all heads) to (all tokens, heads/P); the
tokens are put back in global order (the shards follow ``layout``), every rank runs ordinary attention on its
heads over the whole sequence with the full causal mask, and one all-to-all brings the output back to
(tokens/P, all heads). The backward is the adjoint: four all-to-alls in reverse (dout, then dq, dk, dv).

GQA: rank j needs the K/V heads its query heads read. When H_kv >= P and P divides H_kv that is an even split;
otherwise (e.g. H_kv < P) a K/V head is sent to every rank whose query heads use it, which replicates each head
as little as needed.

Three all-to-alls each way (K and V travel in one, concatenated along the head dim). Bytes sent by rank r
(T: local tokens, b: element size, n_j: K/V heads rank j needs; with a value head dim Dv != D, the k, v
terms carry (D + Dv) instead of 2 * D):

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
    needed = [ulysses_kv_heads(h, h_kv, p, j) for j in range(p)]
    mine = needed[sp.rank]
    tokens = sp.q.shape[0]

    q_parts = comm.all_to_all_differentiable(list(sp.q.split(per_rank, dim=1)), group=sp.group)
    d = sp.k.shape[-1]
    kv = torch.cat([sp.k, sp.v], dim=-1)  # (T, H_kv, D + Dv): one all-to-all for both
    kv_parts = comm.all_to_all_differentiable(
        [kv[:, needed[j]] for j in range(p)], group=sp.group,
        output_shapes=[(tokens, len(mine), kv.shape[-1])] * p,
    )
    order, inverse = sp.rank_major_order()
    q_full = torch.cat(q_parts, 0)[inverse]  # (T*P, H/P, D) in global order
    kv_full = torch.cat(kv_parts, 0)[inverse]
    k_full, v_full = kv_full[..., :d], kv_full[..., d:]

    # Map each local query head to its K/V head; use the kernel's GQA when the mapping is regular.
    group_size = h // h_kv
    kv_of_q = [(sp.rank * per_rank + t) // group_size - mine[0] for t in range(per_rank)]
    ratio = per_rank // len(mine) if per_rank % len(mine) == 0 else 0
    if not ratio or kv_of_q != [t // ratio for t in range(per_rank)]:
        index = torch.tensor(kv_of_q, device=q.device)
        k_full, v_full = k_full[:, index], v_full[:, index]

    cu = sp.global_cu_seqlens()
    hint = None if sp.max_seqlen is None else sp.max_seqlen * p  # every sequence gathered whole: P times longer
    my_sinks = None if sp.sinks is None else sp.sinks[sp.rank * per_rank:(sp.rank + 1) * per_rank]
    out_full = attention(
        q_full, k_full, v_full, causal=sp.causal, scale=sp.scale, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu,
        max_seqlen_q=hint, max_seqlen_k=hint, window=sp.window, softcap=sp.softcap, sinks=my_sinks,
    )
    out_parts = list(out_full[order].split(tokens, dim=0))  # back to rank-major order, one piece per rank
    out = torch.cat(comm.all_to_all_differentiable(out_parts, group=sp.group), dim=1)
    return sp.unpack(out)
