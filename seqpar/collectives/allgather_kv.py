"""All-gather-KV attention: one all-gather of K and V per layer, then local queries against the whole sequence.

The scheme LASP-2H uses for the softmax layers of hybrid models, and the simplest one for packed
variable-length batches. K and V are stacked and gathered in ONE all-gather, put back in global token order,
and each local query chunk (a contiguous range [a, b) of its sequence: one per sequence for ``contiguous``,
two for ``zigzag``) attends to keys [0, b) of its sequence with a bottom-right aligned causal mask (all keys of
its sequence without a mask). The backward reduce-scatters dK and dV (the adjoint of the all-gather).

Bytes sent per rank (T: local tokens, b: element size):

    forward  = (P - 1) * 2 * T * H_kv * D * b          (all-gather of K and V)
    backward = (P - 1) * 2 * T * H_kv * D * b          (reduce-scatter of dK and dV: (P-1)/P of the full tensor)
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.layout import chunk_ranges
from seqpar.collectives.softmax_common import prepare_softmax_sp
from seqpar.kernels.attention import attention

__all__ = ["allgather_kv_attention"]


def allgather_kv_attention(
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
) -> torch.Tensor:
    """Sequence-parallel softmax attention by gathering K and V once. Differentiable.

    Same arguments, shapes and result as ``seqpar.ring_attention``; memory per rank holds the full K and V.

    Raises:
        ValueError: as ``ring_attention``.
    """
    sp = prepare_softmax_sp(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, cu_seqlens=cu_seqlens,
        op="allgather_kv_attention",
        backend=backend,
    )
    p = sp.world_size
    kv = torch.stack([sp.k, sp.v])  # (2, T, H_kv, D): one all-gather for both
    gathered = comm.all_gather_differentiable(kv, group=sp.group)  # (P, 2, T, H_kv, D)
    _, inverse = sp.rank_major_order()
    kv_full = gathered.transpose(0, 1).flatten(1, 2)[:, inverse]  # (2, T*P, H_kv, D), global order

    # One "sequence" per local query chunk [a, b) of each sequence: it reads keys [0, b) of that sequence when
    # causal (bottom-right aligned mask), all of them otherwise.
    bounds = sp.global_cu_seqlens().tolist()
    q_lens, k_lens, key_index = [], [], []
    for start, stop in zip(bounds, bounds[1:]):
        for a, b in chunk_ranges(stop - start, p, sp.rank, sp.layout):
            q_lens.append(b - a)
            k_lens.append(b if sp.causal else stop - start)
            key_index.append(torch.arange(start, start + k_lens[-1], device="cpu"))
    cu_q, cu_k = (
        torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=kv.device) for n in (q_lens, k_lens)
    )
    key_index = torch.cat(key_index).to(kv.device)
    keys = kv_full[:, key_index]
    out = attention(
        sp.q, keys[0], keys[1], causal=sp.causal, scale=sp.scale, backend=backend, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    return sp.unpack(out)
