"""TokenRing: query blocks travel one way around the ring while the partial results computed for them travel
back the other way (Wang et al. 2024, arXiv 2412.20501). K and V never leave their rank.

Forward, P ranks, step s = 0 .. P-1: rank r holds the query shard of rank o = r + s (the shard of rank i
visits rank i - s at step s: queries move to rank - 1) and attends it to its own K/V. Before the kernel of
step s it issues, together,

* the queries of step s + 1: the shard it holds goes to rank r - 1, the one of rank r + s + 1 arrives from
  rank r + 1;
* the partial (out, lse) it computed at step s - 1 for the queries of rank r + s - 1, sent to that owner, and
  the partial of its own queries that rank r - s + 1 computed at step s - 1;

so both transfers overlap the kernel, and while queries leave towards rank - 1 the partials head back the way
the queries came. Step 0 is the local block. After the last kernel one transfer is left: the partials of step
P - 1, which go to rank r - 1. The owner merges the partials in float32 (float64 for float64 input) in the
order ring attention does (K/V shard r, r - 1, r - 2, ...), so the two ops agree to rounding.

Why partials go straight to their owner instead of one hop per step: the partial of step s is s hops behind
the query on its way home. Returned one hop per step (forwarded, or merged along the way) the partial of the
last step reaches its owner only after 2(P-1) steps, none of the return traffic overlaps a kernel, and
TokenRing would be slower than ring attention. Sent to the owner (the paper's full-mesh setting: NVLink or a
PCIe switch; ``comm.send``, one emulated link per peer) every partial arrives one step after it is computed.
At P = 2 and P = 3 every destination is a ring neighbour anyway.

Only what is needed moves (``block_kind``). A block that a causal mask hides completely is not computed and
its partial is not sent, and neither is the query shard to a rank that would skip it. Zigzag with a causal
mask: a query shard first visits lower ranks ("k_first_half", all of it is needed), and after the wrap the
higher ones ("q_second_half", only its second chunk is needed), so after the wrap only the second half of the
queries travels and only those rows of the partial come back. The rows a rank needs are always a subset of
the rows it received, so the shard can be forwarded.

With a ``window`` the steps are only the offsets at which some block meets the window (offset d: rank r
holds the queries of rank r + d; ``softmax_common.window_offsets``, the rule ring attention uses for its K/V),
and each query shard goes straight to the rank that reads it instead of hop by hop: at the step of offset d
rank r sends the rows of its queries that its block against rank r - d reads to rank r - d, receives those of
rank r + d, and sends the partial of the previous step straight home. A block the window hides completely
(``softmax_common.sp_block_kind``) is not computed and nothing travels for it, in either direction, forward and
backward. With the contiguous layout and a causal window shorter than a shard rank r meets only rank r - 1
(1 query message and 1 partial instead of P - 1 each); with zigzag only ranks r - 1 (the whole shard) and r + 1
(its second half). Bytes: the table at the end with W_q, W_o counted over the pairs that meet.

Backward, the same schedule: the query shard travels again, now with everything the remote block needs,
(lse, q, dout, out) of the owner, and the block's dQ comes back to the owner, who adds it to a float32
accumulator. dK and dV never move: each rank adds the contributions of every query shard that visits it to
its own float32 dK/dV. Saved for backward: q, k, v, out, lse only (O(local)); in flight at any time: one query
shard each way (sent and received) and one partial each way.

Each transfer is one message (tensors of one direction and step packed as bytes, the float32 lse first).
Queries use tag ``_TAG_QUERIES`` and partials ``_TAG_PARTIALS``, so at P = 2, where both go to the same peer, a
message never matches the receive of the other stream.

Bytes per step
--------------

b: element size of q/k/v, a: accumulation element size (4; 8 for float64 input). B * S_local is the number of
local tokens (packed input: all local tokens of all sequences). w: how much of the query shard the block the
message serves reads: 1, or 1/2 for zigzag causal after the wrap ("q_second_half"), or 0 for a skipped block
(contiguous causal after the wrap; nothing is sent). Queries: q forward; lse, q, dout, out backward. Partials:
lse and out forward; dQ backward. Ring attention sends nothing towards rank - 1.

===============================  =================================  =====================================
per step s                       forward                            backward
===============================  =================================  =====================================
TokenRing, queries to rank - 1   w * B * S_local * H * D * b        w * B * S_local * H * (3 * D * b + a)
TokenRing, partials to rank + s  w * B * S_local * H * (D * b + a)  w * B * S_local * H * D * b
ring attention, K/V to rank + 1  2 * B * S_local * H_kv * D * b     2 * B * S_local * H_kv * D * (b + 4)
===============================  =================================  =====================================

With H == H_kv each TokenRing direction carries less than ring's one direction (forward: D * b + a < 2 * D * b;
backward: 3 * D * b + a < 2 * D * (b + 4) for b <= 4). With GQA (g = H / H_kv) the forward queries are g/2 times
ring's K/V bytes (the partials (1 + a / (D * b)) times that), so ring sends less once g > 2.

Summed over the steps, rank r sends the step formula with w replaced by W (d = (r - 1) mod P is the rank the
queries go to):

====================  =====================  =====================  =====================
                      no mask                zigzag, causal         contiguous, causal
====================  =====================  =====================  =====================
queries, W_q          P - 1                  P - 1 - d / 2          P - 1 - d
partials, W_o         P - 1                  P - 1 - r / 2          P - 1 - r
mean over ranks       P - 1                  0.75 * (P - 1)         0.5 * (P - 1)
====================  =====================  =====================  =====================

With a ``window``: W_q(r) = sum of w(r, j) over the ranks j != r whose keys r's queries meet, W_o(r) = sum of
w(q, r) over the ranks q != r whose queries meet r's keys, with w(q, j) = 1/2 for zigzag causal and j > q
(only the second chunk of q's queries reads j's keys), else 1. Which shard pairs meet is a function of P, the
local sequence lengths and the window (``softmax_common.blocks_meet``; for a causal window of W tokens on one
sequence, summed over the ranks, ``strategies.window_pair_counts``: W_q and W_o both sum to below + above / 2).
A window that hides nothing of the longest sequence is dropped (the schedule above, no window).

so, with T = B * S_local,

    forward  = W_q * T * H * D * b            + W_o * T * H * (D * b + a)
    backward = W_q * T * H * (3 * D * b + a)  + W_o * T * H * D * b

against ring's (P - 1) * 2 * T * H_kv * D * b forward and (P - 1) * 2 * T * H_kv * D * (b + 4) backward.
``count_comm()`` records them as point-to-point ``send`` bytes per peer and per direction: queries go to
rank r - 1 (``"prev"``), the partial of step s to rank r + s (``"next"``, the opposite way round the ring).

Anchor (the paper, 4 x A10 over PCIe, S = 24,000, H = 32, D = 128, bf16): a query shard is
6000 * 32 * 128 * 2 = 49.2 MB per step (about 3.5 ms at 14 GB/s; 4.6 ms measured once the outputs also cross),
ring's K+V 98.3 MB (7.6 ms).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.softmax_common import (
    SoftmaxSP,
    attend_block,
    add_rows,
    attend_block_backward,
    merge_rows,
    prepare_softmax_sp,
    run_scheduled,
    sp_block_kind,
    window_offsets,
)
from seqpar.kernels.attention import accumulation_dtype

__all__ = ["token_ring_attention"]

_TAG_QUERIES = comm.tags.TOKEN_RING_QUERIES  # query shards (backward: with dout, out, lse) on their way to rank - 1
_TAG_PARTIALS = comm.tags.TOKEN_RING_PARTIALS  # partial results on their way back to the owner of the queries


# ----------------------------------------------------------------------------------------------------
# Messages: token-major tensors (rows on dim 0), a subset of their rows, packed as bytes
# ----------------------------------------------------------------------------------------------------

_SKIP = "skip"


def _rows_needed(sp: SoftmaxSP, kind: str) -> torch.Tensor | None | str:
    """Which rows of a query shard a block of ``kind`` reads: None (all), the second-chunk rows, or _SKIP."""
    if kind == "skip":
        return _SKIP
    return sp.chunk_indices("second") if kind == "q_second_half" else None


def _rows_carried(sp: SoftmaxSP, owner: int, at_rank: int) -> torch.Tensor | None | str:
    """Without a window, the rows of ``owner``'s query shard that must reach ``at_rank`` on their hop-by-hop way:
    those its block reads (the rows needed only shrink along the way, so later blocks read a subset)."""
    return _rows_needed(sp, sp_block_kind(sp, owner, at_rank))


def _n_rows(sp: SoftmaxSP, rows: torch.Tensor | None) -> int:
    return sp.q.shape[0] if rows is None else rows.numel()


def _pack(parts: list[torch.Tensor], rows: torch.Tensor | None, dtypes: list[torch.dtype]) -> torch.Tensor:
    """One uint8 message holding ``rows`` (None: all) of every part, each cast to its dtype."""
    return torch.cat(
        [(p if rows is None else p[rows]).to(d).contiguous().view(-1).view(torch.uint8) for p, d in zip(parts, dtypes)]
    )


def _nbytes(tails: list[tuple[int, ...]], dtypes: list[torch.dtype], n_rows: int) -> int:
    return sum(n_rows * math.prod(t) * d.itemsize for t, d in zip(tails, dtypes))


def _unpack(
    buf: torch.Tensor, tails: list[tuple[int, ...]], dtypes: list[torch.dtype], n_rows: int
) -> list[torch.Tensor]:
    """Views into ``buf`` shaped (n_rows, *tail). Parts come in decreasing element size, so each starts at an
    offset its dtype can be viewed at."""
    parts, offset = [], 0
    for tail, dtype in zip(tails, dtypes):
        n = n_rows * math.prod(tail) * dtype.itemsize
        parts.append(buf[offset : offset + n].view(dtype).view(n_rows, *tail))
        offset += n
    return parts


def _place(own: list[torch.Tensor], parts: list[torch.Tensor], rows: torch.Tensor | None) -> list[torch.Tensor]:
    """Full-size shard tensors from received rows (rows the block does not read stay zero)."""
    if rows is None:
        return parts
    full = [torch.zeros_like(t) for t in own]
    for f, part in zip(full, parts):
        f[rows] = part
    return full


# ----------------------------------------------------------------------------------------------------
# The schedule, shared by forward and backward
# ----------------------------------------------------------------------------------------------------


class _Transfers:
    """One step's point-to-point transfers, posted together by one ``comm.exchange`` and finished together.
    Bytes count under the ring direction of their tag: queries "prev", partials "next"."""

    def __init__(self, sp: SoftmaxSP) -> None:
        self.sp, self.sends, self.recvs, self.names = sp, [], [], []

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.sends.append((tensor, dst % self.sp.world_size, tag))

    def recv(self, name: str, nbytes: int, src: int, tag: int) -> None:
        self.names.append(name)
        self.recvs.append((((nbytes,), torch.uint8), src % self.sp.world_size, tag))

    def start(self) -> "_Transfers":
        self.pending = comm.exchange(self.sends, self.recvs, group=self.sp.group, device=self.sp.q.device)
        return self

    def finish(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.pending.wait()))


def _schedule(sp: SoftmaxSP, own: list[torch.Tensor], result_like: list[torch.Tensor], compute, absorb) -> None:
    """Run the TokenRing steps (module docstring) on rank ``sp.rank``.

    own: this rank's travelling tensors, token-major (T, ...), in decreasing element size.
    result_like: one tensor per result part with the part's (T, ...) shape and dtype (sizes of the messages).
    compute(kind, visiting, owner) -> (rows, results): the block of a visiting shard (of rank ``owner``)
        against the local K/V, with the rows of the shard (None: all) the token-major results cover.
    absorb(rows, results): fold a partial of this rank's own queries into its accumulator.

    Steps: offsets d (this rank holds the queries of rank r + d at the step of offset d). Without a window every
    d = 0 .. P-1, the shard passed hop by hop to rank r - 1; with one only d = 0 and ``window_offsets`` (the
    offsets at which some block meets the window), each shard sent straight to the rank that reads it.
    """
    p, r = sp.world_size, sp.rank
    direct = sp.window is not None
    offsets = [0, *window_offsets(sp)] if direct else list(range(p))
    kind_of = lambda q_rank, kv_rank: sp_block_kind(sp, q_rank % p, kv_rank % p)  # noqa: E731
    tails, dtypes = [tuple(t.shape[1:]) for t in own], [t.dtype for t in own]
    r_tails, r_dtypes = [tuple(t.shape[1:]) for t in result_like], [t.dtype for t in result_like]

    def return_partials(transfers: _Transfers, offset: int, outgoing) -> torch.Tensor | None | str:
        """Add the transfers that take the partials computed at ``offset`` home; returns the rows of ours."""
        if outgoing is not None:  # ours, for the queries of rank r + offset
            transfers.send(_pack(outgoing[1], None, r_dtypes), r + offset, _TAG_PARTIALS)
        rows = _rows_needed(sp, kind_of(r, r - offset))  # what rank r - offset computed for our queries
        if rows is not _SKIP:
            transfers.recv("partial", _nbytes(r_tails, r_dtypes, _n_rows(sp, rows)), r - offset, _TAG_PARTIALS)
        return rows

    def absorb_partial(received: dict, rows) -> None:
        if "partial" in received:
            absorb(rows, _unpack(received["partial"], r_tails, r_dtypes, _n_rows(sp, rows)))

    visiting, outgoing = own, None
    for step, offset in enumerate(offsets):
        owner = r + offset  # whose queries this rank holds now
        transfers = _Transfers(sp)
        if step + 1 < len(offsets):
            ahead = offsets[step + 1]
            if direct:  # our queries straight to rank r - ahead, rank r + ahead's straight to us
                sent, send_rows, dst = own, _rows_needed(sp, kind_of(r, r - ahead)), r - ahead
                next_rows, src = _rows_needed(sp, kind_of(r + ahead, r)), r + ahead
            else:  # pass the shard on to rank r - 1, receive the one of the next step from rank r + 1
                sent, send_rows, dst = visiting, _rows_carried(sp, owner % p, (r - 1) % p), r - 1
                next_rows, src = _rows_carried(sp, (owner + 1) % p, r), r + 1
            if send_rows is not _SKIP:
                transfers.send(_pack(sent, send_rows, dtypes), dst, _TAG_QUERIES)
            if next_rows is not _SKIP:
                transfers.recv("queries", _nbytes(tails, dtypes, _n_rows(sp, next_rows)), src, _TAG_QUERIES)
        # the partials of the previous step go home (step 0 is local, its partial is absorbed at once)
        incoming_rows = return_partials(transfers, offsets[step - 1], outgoing) if step > 1 else _SKIP
        transfers.start()

        kind = kind_of(owner, r)
        outgoing = None
        if kind != "skip":
            rows, results = compute(kind, visiting, owner % p)
            if step == 0:
                absorb(rows, results)
            else:
                outgoing = (rows, results)

        received = transfers.finish()
        absorb_partial(received, incoming_rows)
        if "queries" in received:
            visiting = _place(own, _unpack(received["queries"], tails, dtypes, _n_rows(sp, next_rows)), next_rows)
        elif step + 1 < len(offsets):
            visiting = None  # the next block is skipped (without a window rank r - 1 skips it too: rows only shrink)
    if len(offsets) > 1:  # the partials of the last step go home
        transfers = _Transfers(sp)
        incoming_rows = return_partials(transfers, offsets[-1], outgoing)
        absorb_partial(transfers.start().finish(), incoming_rows)


# ----------------------------------------------------------------------------------------------------
# Forward and backward
# ----------------------------------------------------------------------------------------------------


def _token_ring_forward(sp: SoftmaxSP, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (T, H, D) out in the accumulation dtype and (H, T) lse."""
    acc = accumulation_dtype(sp.q.dtype)
    t, h = sp.q.shape[:2]
    state = {"out": None, "lse": None}

    def compute(kind, visiting, owner):
        rows, out, lse = attend_block(sp, visiting[0], sp.k, sp.v, kind, backend, ranks=(owner, sp.rank))
        return rows, [lse.t(), out]  # token-major: lse as (rows, H)

    def absorb(rows, results):
        lse_t, out = results
        state["out"], state["lse"] = merge_rows(state["out"], state["lse"], rows, out, lse_t.t(), t)

    result_like = [sp.q.new_empty((t, h), dtype=acc), sp.q.new_empty((t, h, sp.v.shape[-1]))]  # lse first, then out
    _schedule(sp, [sp.q], result_like, compute, absorb)
    return state["out"], state["lse"]


def _token_ring_backward(
    sp: SoftmaxSP, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(sp.q.dtype)
    dq = torch.zeros(sp.q.shape, dtype=acc, device=sp.q.device)
    dk = torch.zeros(sp.k.shape, dtype=acc, device=sp.k.device)
    dv = torch.zeros(sp.v.shape, dtype=acc, device=sp.v.device)

    def compute(kind, visiting, owner):
        lse_t, q, d_out, o = visiting
        q_rows, g_q, kv_rows, g_k, g_v = attend_block_backward(
            sp, d_out, q, sp.k, sp.v, o, lse_t.t().contiguous(), kind, backend, ranks=(owner, sp.rank)
        )
        add_rows(dk, kv_rows, g_k)  # dK/dV stay home: every visiting shard adds its share here
        add_rows(dv, kv_rows, g_v)
        return q_rows, [g_q]

    def absorb(rows, results):
        add_rows(dq, rows, results[0])

    own = [lse.t().contiguous(), sp.q, dout, out]  # lse (accumulation dtype) first
    _schedule(sp, own, [sp.q], compute, absorb)
    return dq.to(sp.q.dtype), dk.to(sp.k.dtype), dv.to(sp.v.dtype)


def token_ring_attention(
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
    """Sequence-parallel softmax attention over ``group``, TokenRing schedule: query shards travel to rank - 1,
    partial results come straight back to their owner, K/V stay home. Differentiable.

    Same arguments, shapes, layouts, varlen/GQA support, dtypes and result as ``seqpar.ring_attention``; the
    bytes per step and per direction are in the module docstring.

    Args:
        q: this rank's queries, (B, S_local, H, D), or packed (T_local, H, D) with ``cu_seqlens``.
        k, v: this rank's keys/values, (B, S_local, H_kv, D) or (T_local, H_kv, D); H % H_kv == 0.
        group: the SP process group (default: the world).
        causal: causal mask in GLOBAL token positions.
        softmax_scale: default 1 / sqrt(D).
        layout: ``"zigzag"`` or ``"contiguous"``, exactly as ``seqpar.shard_sequence`` cut the shards.
        cu_seqlens: int32 LOCAL cumulative lengths of a packed batch.
        backend: kernel backend, ``"auto"``, ``"torch"``, ``"triton"`` or ``"flash_attn"``.
        max_seqlen: the packed batch's host-side hint, as in ``seqpar.ring_attention``.
        window, softcap, sinks: as ``seqpar.ring_attention``; what a window saves here is in the module docstring.

    Returns:
        This rank's output, shaped like ``q``, in q's dtype.

    Raises:
        ValueError: bad shapes, dtypes, layout, ``cu_seqlens``, group or backend, on every rank, before any
            communication.
    """
    sp = prepare_softmax_sp(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, cu_seqlens=cu_seqlens,
        op="token_ring_attention",
        backend=backend, max_seqlen=max_seqlen, window=window, softcap=softcap, sinks=sinks,
    )
    return run_scheduled(q, k, v, sp, backend, _token_ring_forward, _token_ring_backward)
