"""All-gather-KV attention: one all-gather of K and V per layer, then local queries against the whole sequence.

The scheme LASP-2H uses for the softmax layers of hybrid models, and the simplest one for packed
variable-length batches. K and V are concatenated and gathered in ONE all-gather, put back in global token order,
and each local query chunk (a contiguous range [a, b) of its sequence: one per sequence for ``contiguous``,
two for ``zigzag``) attends to keys [0, b) of its sequence with a bottom-right aligned causal mask (all keys of
its sequence without a mask). The backward reduce-scatters dK and dV (the adjoint of the all-gather).

Bytes sent per rank (T: local tokens, b: element size):

    forward  = (P - 1) * 2 * T * H_kv * D * b          (all-gather of K and V)
    backward = (P - 1) * 2 * T * H_kv * D * b          (reduce-scatter of dK and dV: (P-1)/P of the full tensor)

(2 * D becomes D + Dv when v's head dim Dv differs.)
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.softmax_common import SoftmaxSP, prepare_softmax_sp, token_sequence
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
    max_seqlen: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-parallel softmax attention by gathering K and V once. Differentiable.

    Same arguments, shapes and result as ``seqpar.ring_attention`` (``window``, ``softcap``, ``sinks`` and a
    value head dim != D included); memory per rank holds the full K and V. With a window the kernel compares
    the global positions of the local query chunks and of the keys each reads.

    Raises:
        ValueError: as ``ring_attention``.
    """
    sp = prepare_softmax_sp(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, cu_seqlens=cu_seqlens,
        op="allgather_kv_attention",
        backend=backend, max_seqlen=max_seqlen, window=window, softcap=softcap, sinks=sinks,
    )
    d = sp.k.shape[-1]
    kv = torch.cat([sp.k, sp.v], dim=-1)  # (T, H_kv, D + Dv): one all-gather for both
    gathered = comm.all_gather_differentiable(kv, group=sp.group)  # (P, T, H_kv, D + Dv)
    _, inverse = sp.rank_major_order()  # gathered.flatten(0, 1)[inverse]: K/V in global token order

    # One "sequence" per local query chunk [a, b) of each sequence: it reads keys [0, b) of that sequence when
    # causal (bottom-right aligned mask), all of them otherwise. Built on the device from cu_seqlens and the
    # token counts (host-known from the shapes), so nothing is read on the host.
    cu_q, cu_k, key_index, max_q, max_k = _chunk_operands(sp)
    # the two reorderings composed on the (small) index: one gather of the keys, not a reordered copy of all of
    # K/V first (and one scatter-add back instead of two in the backward)
    keys = gathered.flatten(0, 1)[inverse[key_index]]  # (sum of chunk key lengths, H_kv, D + Dv)
    positions = {}
    if sp.window is not None:  # the chunks' queries are not bottom-right aligned with all their keys: say where
        cu = sp.global_cu_seqlens().long()
        key_sequence = torch.bucketize(key_index, cu[1:], right=True)  # the sequence of each global key index
        positions = {"q_positions": sp.positions(sp.rank), "k_positions": key_index - cu[key_sequence]}
    out = attention(
        sp.q, keys[..., :d], keys[..., d:], causal=sp.causal, scale=sp.scale, backend=backend, cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, window=sp.window, softcap=sp.softcap,
        sinks=sp.sinks, **positions,
    )
    return sp.unpack(out)


def _chunk_operands(sp: SoftmaxSP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None, int | None]:
    """``(cu_q, cu_k, key_index, max_seqlen_q, max_seqlen_k)`` of the per-chunk packed problem: the local query
    chunks (``layout.chunk_ranges`` of every sequence, in local order) as sequences, each with the global keys it
    reads (``key_index`` into the gathered K/V). The hints are derived from ``sp.max_seqlen`` (None without it)."""
    p, r, local_tokens = sp.world_size, sp.rank, sp.q.shape[0]
    cu = sp.global_cu_seqlens().long()
    start, length = cu[:-1, None], (cu[1:] - cu[:-1])[:, None]  # (n, 1) per global sequence
    if sp.layout == "contiguous":
        first = r * length // p
        chunk_starts, chunk_len, n_chunks = first, length // p, 1
    else:
        chunk_len = length // (2 * p)
        chunk_starts, n_chunks = torch.cat([r * chunk_len, (2 * p - 1 - r) * chunk_len], 1), 2
        chunk_len = chunk_len.expand_as(chunk_starts)
    q_lens = chunk_len.flatten()
    k_lens = ((chunk_starts + chunk_len) if sp.causal else length.expand_as(chunk_starts)).flatten()
    # sum(k_lens) from the shapes alone: sum(L) = P * local_tokens, and each sequence's chunks are L / n_chunks / P
    if not sp.causal:
        key_total = n_chunks * p * local_tokens
    elif sp.layout == "contiguous":
        key_total = (r + 1) * local_tokens
    else:
        key_total = (2 * p + 1) * local_tokens // 2  # chunks r and 2P-1-r read (r+1) + (2P-r) chunks of keys
    zero = cu.new_zeros(1)
    cu_q, cu_k = (torch.cat([zero, lens.cumsum(0)]).to(torch.int32) for lens in (q_lens, k_lens))
    seq = token_sequence(cu_k, key_total)
    seq_start = start.expand_as(chunk_starts).flatten()[seq]
    key_index = seq_start + torch.arange(key_total, device=cu.device) - cu_k.long()[seq]
    m = sp.max_seqlen
    if m is None:
        return cu_q, cu_k, key_index, None, None
    max_k = (m * p if not sp.causal else (r + 1) * m if sp.layout == "contiguous" else (2 * p - r) * (m // 2))
    return cu_q, cu_k, key_index, m // n_chunks, max_k
