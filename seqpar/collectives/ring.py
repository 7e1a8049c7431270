"""Ring attention: K/V blocks travel around the ring while every rank attends its queries to them.

Forward, P ranks, step s = 0 .. P-1: rank r holds the K/V shard of rank j = r - s. Before running the block
kernel of step s it issues the transfer that brings the shard of step s + 1 (send to r + 1, receive from
r - 1), so the transfer overlaps the kernel. Partial (out, lse) are merged in float32 with the -inf safe
update, inside the kernel's epilogue when the backend fuses it (Triton). Blocks that a causal mask hides
completely are skipped (see ``softmax_common.block_kind``; with zigzag every rank does the same work).

Backward, same ring: at step s rank r holds the K/V shard of rank j = r - s again (re-sent, overlapped the same
way) and a float32 accumulator of dK/dV for shard j that travels one step behind it: created empty at step 1,
it collects the contribution of every rank it visits and, after the last step, arrives home at rank j, which
adds its own contribution (kept local since step 0). dQ never leaves the rank. Saved for backward: q, k, v,
out, lse only.

Bytes sent per rank (b: element size of the inputs, T: local tokens, all sequences together):

=========  ==============================================================
forward    (P - 1) * T * H_kv * (D + Dv) * b                      (K and V)
backward   (P - 1) * T * H_kv * (D + Dv) * b  +  (P - 1) * T * H_kv * (D + Dv) * 4
           (K and V again, then the float32 dK/dV accumulators)
=========  ==============================================================

(Dv: v's head dim, D for most models. K and V travel as two messages, one after the other on one tag, and so
do their accumulators: nothing is packed into a joint buffer, which would cost a copy of both each way. From the
third hop on, a hop receives into the buffers the previous hop sent, whose kernel has run and whose exchange has
finished, instead of allocating new ones: at P = 4 that is 32 MB fewer allocated per fp32 step at S = 8192.)

With a ``window`` only the shard pairs that meet inside it are computed and only what they need is sent: rank r
sends its K/V straight to each rank q != r whose queries see some of its keys (``softmax_common.blocks_meet``:
from the layout, the window and the local sequence lengths), one message per such rank, issued one step ahead
of the block that reads it, and in the backward sends it again and returns the float32 dK/dV that rank q
computed for it straight home. A window shorter than a shard needs only the neighbouring shards: with the
contiguous layout and a causal window the rank before (1 message instead of P - 1); with zigzag the ranks
r - 1 and r + 1 (2 instead of P - 1). Bytes with a window, n_out(r) = #{q != r : q's queries see r's keys},
n_in(r) = #{j != r : r's queries see j's keys}:

=========  ==============================================================
forward    n_out(r) * T * H_kv * (D + Dv) * b
backward   n_out(r) * T * H_kv * (D + Dv) * b  +  n_in(r) * T * H_kv * (D + Dv) * 4
=========  ==============================================================
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.comm.transport import global_rank
from seqpar.collectives.softmax_common import (
    SoftmaxSP,
    add_rows,
    attend_and_merge,
    attend_block_backward,
    block_kind,
    prepare_softmax_sp,
    run_scheduled,
    sp_block_kind,
    window_offsets,
)
from seqpar.kernels.attention import accumulation_dtype

__all__ = ["ring_attention"]

_KV_STREAM, _DKV_STREAM = 0, 1  # ring_exchange streams: their tags are in comm.tags (RING_NEXT + 100 * stream)


def _flat_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V as one flat message (their head dims may differ, so they cannot be stacked)."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _split_kv(flat: torch.Tensor, sp: SoftmaxSP) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of K and V, shaped like ``sp.k`` / ``sp.v``, in a flat message (or accumulator) of ``_flat_kv``."""
    n = sp.k.numel()
    return flat[:n].view(sp.k.shape), flat[n:].view(sp.v.shape)


def _ring_step(
    tensors: tuple[torch.Tensor, ...], sp: SoftmaxSP, stream: int, into: tuple[torch.Tensor, ...] | None = None
) -> comm.PendingTransfer:
    """Send ``tensors`` to rank + 1 and receive rank - 1's (same shapes and dtypes) as separate messages, in order
    on one tag: K and V (or their accumulators) travel without being packed into one buffer (a copy each way).
    ``into``: buffers of ours that nothing reads any more (what an earlier, finished step sent), received into
    instead of allocating new ones where they fit; None: new buffers."""
    tag = comm.tags.ring_tag("next", stream)
    r, p = sp.rank, sp.world_size
    prv, nxt = (global_rank(sp.group, (r - 1) % p), global_rank(sp.group, (r + 1) % p))
    spare = into if into is not None else (None,) * len(tensors)
    buffers = [b if b is not None and b.shape == t.shape and b.dtype == t.dtype and b.is_contiguous()
               else (t.shape, t.dtype) for t, b in zip(tensors, spare)]
    return comm.exchange([(t, (r + 1) % p, tag) for t in tensors],
                         [(buf, (r - 1) % p, tag) for buf in buffers], group=sp.group,
                         device=tensors[0].device, describe=f"ring exchange on rank {r} (peers {prv}, {nxt})")


def _ring_forward(sp: SoftmaxSP, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (T, H, Dv) out in the accumulation dtype and (H, T) lse."""
    if sp.window is not None:
        return _window_forward(sp, backend)
    kv, spare = (sp.k, sp.v), None
    out = lse = None
    for step in range(sp.world_size):
        # received into the previous step's K/V buffers: their kernel has run and their send finished at its wait
        pending = _ring_step(kv, sp, _KV_STREAM, into=spare) if step < sp.world_size - 1 else None
        kv_rank = (sp.rank - step) % sp.world_size
        kind = block_kind(sp.layout, sp.causal, sp.rank, kv_rank)
        if kind != "skip":
            out, lse = attend_and_merge(sp, *kv, kind, out, lse, backend, kv_rank=kv_rank)
        if pending is not None:
            # kept only for a next hop (our own K/V are the caller's): a spare held through the last kernel
            # would raise the peak
            kv, spare = tuple(pending.wait()), (kv if 0 < step < sp.world_size - 2 else None)
    return out, lse


def _ring_backward(
    sp: SoftmaxSP, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if sp.window is not None:
        return _window_backward(sp, dout, out, lse, backend)
    acc = accumulation_dtype(sp.q.dtype)
    shapes = (sp.k.shape, sp.v.shape)
    # step 0's block gradients become the accumulators (no zero-filled copies where a block covers every row)
    dq = own_dkv = None
    kv, pending_dkv = (sp.k, sp.v), None
    spare_kv = sent_dkv = None  # buffers nothing reads any more, received into (as in the forward)
    for step in range(sp.world_size):
        pending_kv = _ring_step(kv, sp, _KV_STREAM, into=spare_kv) if step < sp.world_size - 1 else None
        kv_rank = (sp.rank - step) % sp.world_size
        kind = block_kind(sp.layout, sp.causal, sp.rank, kv_rank)
        kv_rows = g_kv = None
        if kind != "skip":
            q_rows, g_q, kv_rows, g_k, g_v = attend_block_backward(
                sp, dout, sp.q, *kv, out, lse, kind, backend, ranks=(sp.rank, kv_rank), views=True
            )
            dq = _accumulate(dq, q_rows, g_q, sp.q.shape, acc)
            g_kv = (g_k, g_v)
            del g_q, g_k, g_v
        if step == 0:  # our own shard's dK/dV stay home (step 0's block always reads it: causal or full)
            own_dkv = [_accumulate(None, kv_rows, g, shape, acc) for g, shape in zip(g_kv, shapes)]
        else:
            if pending_dkv is None:  # step 1: the accumulators of shard r - 1 start from this block's gradients
                if g_kv is None:
                    target = [torch.zeros(shape, dtype=acc, device=sp.k.device) for shape in shapes]
                else:
                    target = [_accumulate(None, kv_rows, g, shape, acc) for g, shape in zip(g_kv, shapes)]
            else:  # what the previous rank accumulated for shard r - step so far: ours is added into it
                target = pending_dkv.wait()
                if g_kv is not None:
                    for total, g in zip(target, g_kv):
                        add_rows(total, kv_rows, g)
            g_kv = None  # the block's dK/dV are freed before the exchange allocates its receive buffers
            # the accumulators sent one step ago are received into: their exchange finished at the wait above
            pending_dkv = _ring_step(tuple(target), sp, _DKV_STREAM, into=sent_dkv)
            sent_dkv = tuple(target) if step < sp.world_size - 1 else None
            del target
        g_kv = None
        if pending_kv is not None:
            kv, spare_kv = tuple(pending_kv.wait()), (kv if 0 < step < sp.world_size - 2 else None)
    if pending_dkv is not None:  # after the last step the accumulators of our own shard arrive home
        for total, home in zip(own_dkv, pending_dkv.wait()):
            total += home
    dk, dv = own_dkv
    return dq.to(sp.q.dtype), dk.to(sp.k.dtype), dv.to(sp.v.dtype)


def _accumulate(total: torch.Tensor | None, rows, values: torch.Tensor, shape: torch.Size,
                acc: torch.dtype) -> torch.Tensor:
    """``total[rows] += values`` (rows None: all). ``total`` None starts the sum from ``values``, the kernel's
    fresh gradient, which is kept as it is when it covers every row in the accumulation dtype (no copy)."""
    if total is None:
        if rows is None:
            return values.to(acc)
        total = torch.zeros(shape, dtype=acc, device=values.device)
    add_rows(total, rows, values)
    return total


# ----------------------------------------------------------------------------------------------------
# With a window: K/V straight to the ranks that need them (module docstring)
# ----------------------------------------------------------------------------------------------------

_KV_TAG = comm.tags.ring_tag("next", _KV_STREAM)  # K/V to rank + d
_DKV_TAG = comm.tags.ring_tag("prev", _DKV_STREAM)  # dK/dV back to rank - d, the owner


def _post_kv(sp: SoftmaxSP, kv: torch.Tensor, offset: int) -> comm.PendingTransfer | None:
    """Send our K/V to rank + offset if its queries need them, receive rank - offset's if ours do."""
    r, p = sp.rank, sp.world_size
    sends = [(kv, (r + offset) % p, _KV_TAG)] if sp_block_kind(sp, r + offset, r) != "skip" else []
    wanted = sp_block_kind(sp, r, r - offset) != "skip"
    recvs = [(((kv.numel(),), kv.dtype), (r - offset) % p, _KV_TAG)] if wanted else []
    if not sends and not recvs:
        return None
    return comm.exchange(sends, recvs, group=sp.group, device=kv.device)


def _window_forward(sp: SoftmaxSP, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    own = _flat_kv(sp.k, sp.v)
    offsets = [0, *window_offsets(sp)]
    out = lse = None
    kv = own
    for step, offset in enumerate(offsets):
        pending = _post_kv(sp, own, offsets[step + 1]) if step + 1 < len(offsets) else None
        kind = sp_block_kind(sp, sp.rank, sp.rank - offset)
        if kind != "skip":
            out, lse = attend_and_merge(sp, *_split_kv(kv, sp), kind, out, lse, backend,
                                        kv_rank=(sp.rank - offset) % sp.world_size)
        received = [] if pending is None else pending.wait()
        kv = received[0] if received else None
    return out, lse


def _window_backward(
    sp: SoftmaxSP, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, p = sp.rank, sp.world_size
    acc = accumulation_dtype(sp.q.dtype)
    dq = torch.zeros(sp.q.shape, dtype=acc, device=sp.q.device)
    own_dkv = torch.zeros(sp.k.numel() + sp.v.numel(), dtype=acc, device=sp.k.device)
    own = _flat_kv(sp.k, sp.v)
    offsets = [0, *window_offsets(sp)]
    kv, pending_dkv = own, None
    for step, offset in enumerate(offsets):
        pending_kv = _post_kv(sp, own, offsets[step + 1]) if step + 1 < len(offsets) else None
        kind = sp_block_kind(sp, r, r - offset)
        target = own_dkv if offset == 0 else torch.zeros_like(own_dkv)
        if kind != "skip":
            q_rows, g_q, kv_rows, g_k, g_v = attend_block_backward(
                sp, dout, sp.q, *_split_kv(kv, sp), out, lse, kind, backend, ranks=(r, (r - offset) % p)
            )
            add_rows(dq, q_rows, g_q)
            target_k, target_v = _split_kv(target, sp)
            add_rows(target_k, kv_rows, g_k)
            add_rows(target_v, kv_rows, g_v)
        if pending_dkv is not None:  # our shard's dK/dV from the rank that read it at the previous offset
            for received in pending_dkv.wait():
                own_dkv += received
            pending_dkv = None
        if offset > 0:  # this block's dK/dV go home to rank - offset; rank + offset's for our shard arrive
            sends = [(target, (r - offset) % p, _DKV_TAG)] if kind != "skip" else []
            wanted = sp_block_kind(sp, r + offset, r) != "skip"
            recvs = [(((own_dkv.numel(),), acc), (r + offset) % p, _DKV_TAG)] if wanted else []
            if sends or recvs:
                pending_dkv = comm.exchange(sends, recvs, group=sp.group, device=own_dkv.device)
        received = [] if pending_kv is None else pending_kv.wait()
        kv = received[0] if received else None
    if pending_dkv is not None:
        for received in pending_dkv.wait():
            own_dkv += received
    dk, dv = _split_kv(own_dkv, sp)
    return dq.to(sp.q.dtype), dk.to(sp.k.dtype), dv.to(sp.v.dtype)


def ring_attention(
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
    """Sequence-parallel softmax attention over ``group`` by passing K/V around a ring. Differentiable.

    Args:
        q: this rank's queries, (B, S_local, H, D), or packed (T_local, H, D) with ``cu_seqlens``.
        k, v: this rank's keys/values, (B, S_local, H_kv, D) or (T_local, H_kv, D); H % H_kv == 0; v's head
            dim Dv may differ from D (MLA).
        group: the SP process group (default: the world).
        causal: causal mask in GLOBAL token positions.
        softmax_scale: default 1 / sqrt(D).
        layout: how the shards were cut, ``"zigzag"`` (balanced causal work) or ``"contiguous"``; exactly as
            ``seqpar.shard_sequence`` makes them.
        cu_seqlens: int32 LOCAL cumulative lengths of a packed batch (from ``shard_sequence(..., cu_seqlens=)``).
        backend: kernel backend, ``"auto"``, ``"torch"``, ``"triton"`` or ``"flash_attn"``.
        max_seqlen: with ``cu_seqlens``, the longest local sequence, from whoever packed and validated the batch
            (``StepShard.max_seqlen``: the runtime, once per step). Given, ``cu_seqlens`` is not read on the host
            (no device sync per layer) and is trusted to be valid; None: it is read and validated here.
        window: ``(left, right)``: query i (GLOBAL position within its sequence) sees keys j with
            ``i - left <= j <= i + right`` (-1: unbounded; with ``causal`` also j <= i), flash-attn's
            ``window_size``. Only the shards that meet inside it are computed and sent (module docstring).
        softcap: scores s (after the scale) become ``softcap * tanh(s / softcap)`` (Gemma 2); None: off.
        sinks: (H,) per-head sink logits (gpt-oss), added once to the softmax denominator; differentiable
            (this rank's share of their gradient: sum it over the group, as for any replicated parameter).

    Returns:
        This rank's output, shaped like ``q`` with v's head dim, in q's dtype.

    Raises:
        ValueError: bad shapes, dtypes, layout, ``cu_seqlens`` or group, on every rank, before any communication.
    """
    sp = prepare_softmax_sp(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, cu_seqlens=cu_seqlens,
        op="ring_attention",
        backend=backend, max_seqlen=max_seqlen, window=window, softcap=softcap, sinks=sinks,
    )
    return run_scheduled(q, k, v, sp, backend, _ring_forward, _ring_backward)
