"""ZeCO (Chou et al. 2025, arXiv 2507.01004): linear-attention SP over the pipelined All-Scan.

Same math and notation as ``seqpar.collectives.lasp2`` (M_r, D_r, S_in(r), L_r, a_r). Where LASP-2 gathers
every rank's state on every rank, ZeCO passes one state along the chain: rank r receives exactly S_in(r)
(``seqpar.collectives.scan``), so per rank the bytes are one state whatever P is.

How the compute overlaps the scan (one thread per rank, asynchronous point-to-point transfers):

* forward: the receives of S_in(r)'s pieces are posted first, then the intra-chunk output and M_r are
  computed (the O(S C D) kernel). Every rank computes at the same time, and rank r - 1's pieces land in the
  posted buffers while rank r is still computing, so the transfer of a piece into rank r costs rank r no time
  unless it arrives after rank r's own compute. Then the relay: piece j (a slice of Dk) is combined with
  M_r and forwarded to rank r + 1 at once, before piece j + 1 is waited for, so the chain is pipelined: the
  last rank has its state P - 1 + K - 1 piece hops (K pieces) after the compute, not P - 1 whole-state hops.
  Then the inter-chunk term with the whole S_in(r). (Computing the inter term piece by piece while later
  pieces arrive costs 2.4x one call on CPU at D = 64, more than the wait it hides.)
* backward: the receives of a_{r+1} (the gradient of the state leaving this chunk) from rank r + 1 are
  posted first; L_r is computed, then all gradients through the outputs (intra-chunk and inter terms, S_in(r)
  being known) while the reverse scan comes down the chain; then the relay a_r = L_r + exp(D_r) a_{r+1} to
  rank r - 1, then the gradients through M_r and D_r.

What stays on the critical path is the scan's ripple (P - 1 + K - 1 piece hops) between the last rank's
intra-chunk compute and its inter term; LASP-2 instead hides its one all-gather behind the intra-chunk
compute but sends (P - 1) states.

Bytes sent per rank (N = B*H*Dk*Dv; e = 8 for float64 input, else 4; 0 when P = 1):

    forward  = [r < P-1] * N * e            (All-Scan: one state)
             + [output_final_state] * [r = P-1] * (P-1) * N * e     (rank P-1 sends the final state to each rank)
    backward = [r > 0] * N * e              (reverse All-Scan: one state)
             + [output_final_state] * [r < P-1] * N * e             (each rank's final-state gradient to rank P-1)

Independent of the sequence length and of the decay kind (the decay never travels).

Gradient conventions: as LASP-2 (partial gradients of whole-held inputs, summed over ranks for the full
gradient; the final state's gradients from all ranks are summed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar import tracing
from seqpar.collectives import comm
from seqpar.collectives.scan import ScanRelay, piece_sizes
from seqpar.collectives.lasp2 import (
    LinearSP,
    add_grads,
    grads_through_outputs,
    grads_through_state,
    incoming_state_grad,
    prepare_linear_sp,
)
from seqpar.kernels.linear import linear_attention_chunk, linear_attention_inter, total_log_decay

__all__ = ["zeco_linear_attention"]

TAG_FINAL_STATE = comm.tags.ZECO_FINAL_STATE  # rank P-1 -> every rank: the final state
TAG_FINAL_GRAD = comm.tags.ZECO_FINAL_GRAD  # every rank -> rank P-1: its final-state gradient


class _Zeco(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, sp: LinearSP, output_final_state: bool, backend: str,
                num_pieces: int | None):
        b, s, h, _, _ = sp.shape
        last = sp.world_size - 1
        relay = ScanRelay(sp.state_shape, sp.cdt, q.device, group=sp.group, num_pieces=num_pieces)
        final_recv = None
        if output_final_state and sp.rank != last:
            buf = torch.empty(sp.state_shape, dtype=sp.cdt, device=q.device)
            final_recv = comm.recv(buf, last, group=sp.group, tag=TAG_FINAL_STATE)
        tracing.record("kernel", name="zeco.intra")
        o_intra, m = linear_attention_chunk(q, k, v, log_decay=log_decay, scale=sp.scale, output_final_state=True,
                                            backend=backend)
        d = total_log_decay(log_decay, b, s, h, sp.cdt, q.device)
        s_in, s_out = relay.relay(m, d, initial_state=initial_state)
        final, final_sends = None, []
        if output_final_state and sp.rank == last:  # s_out is the whole sequence's final state: send it on now
            final = s_out
            final_sends = [comm.send(final, j, group=sp.group, tag=TAG_FINAL_STATE) for j in range(last)]
        tracing.record("kernel", name="zeco.inter")
        o = o_intra.to(sp.cdt) + linear_attention_inter(q, s_in, log_decay=log_decay, scale=sp.scale)
        if final_recv is not None:
            final = final_recv.wait()
        relay.finish()
        for pending in final_sends:
            pending.wait()
        ctx.sp, ctx.output_final_state, ctx.backend, ctx.num_pieces = sp, output_final_state, backend, num_pieces
        ctx.has_initial = initial_state is not None
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.save_for_backward(q, k, v, log_decay, s_in)
        return o.to(q.dtype), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, log_decay, s_in = ctx.saved_tensors
        sp: LinearSP = ctx.sp
        b, s, h, _, _ = sp.shape
        last = sp.world_size - 1
        needs = ctx.needs_input_grad
        # post the receives of a_{r+1} first: the reverse scan comes down the chain while we compute
        relay = ScanRelay(sp.state_shape, sp.cdt, q.device, group=sp.group, num_pieces=ctx.num_pieces, reverse=True)
        d_final, grad_recvs, grad_send = None, [], None
        if ctx.output_final_state:  # a_P = the sum of every rank's final-state gradient, collected on rank P-1
            d_final = (
                torch.zeros(sp.state_shape, dtype=sp.cdt, device=q.device) if dfinal is None else dfinal.to(sp.cdt)
            )
            if sp.rank == last:
                grad_recvs = [
                    comm.recv(torch.empty_like(d_final), j, group=sp.group, tag=TAG_FINAL_GRAD) for j in range(last)
                ]
            else:
                grad_send = comm.send(d_final, last, group=sp.group, tag=TAG_FINAL_GRAD)
        l_r = incoming_state_grad(q, log_decay, s_in, do, sp)
        tracing.record("kernel", name="zeco.intra_backward")
        grads = grads_through_outputs(q, k, v, log_decay, s_in, do, sp, ctx.backend, needs[:4])
        if grad_recvs:
            d_final = d_final + sum(pending.wait() for pending in grad_recvs)
        # reverse All-Scan: receive a_{r+1}, send a_r = L_r + exp(D_r) a_{r+1} to rank r - 1
        d_total = total_log_decay(log_decay, b, s, h, sp.cdt, q.device)
        a_next, a_here = relay.relay(l_r, d_total, initial_state=d_final)
        tracing.record("kernel", name="zeco.state_backward")
        grads = add_grads(grads, grads_through_state(k, v, log_decay, s_in, a_next, sp, needs[:4]))
        relay.finish()
        if grad_send is not None:
            grad_send.wait()
        d_init = None
        if ctx.has_initial and needs[4]:  # whole-held: all of a_0 on rank 0, zeros elsewhere
            d_init = (a_here if sp.rank == 0 else torch.zeros_like(a_here)).to(ctx.initial_dtype)
        return (*grads, d_init, None, None, None, None)


def zeco_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    layout: str = "contiguous",
    num_pieces: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel linear attention by ZeCO: the incoming state arrives by a pipelined All-Scan.

    Args:
        q, k: (B, S_local, H, Dk) local shards (contiguous layout); v: (B, S_local, H, Dv).
        log_decay: None, (H,) per-head (the same whole tensor on every rank) or (B, S_local, H) per token
            (local shard); all <= 0.
        scale: default 1 / sqrt(Dk).
        initial_state: (B, H, Dk, Dv), the state before rank 0's first token (the same on every rank).
        output_final_state: also return the whole sequence's final state (B, H, Dk, Dv), on every rank (rank
            P-1 has it after the scan and sends it to the others).
        layout: must be ``"contiguous"``.
        num_pieces: pieces along Dk the state travels in (default ``min(8, Dk)``).
        backend: kernel backend for the intra-chunk part.

    Returns:
        o (B, S_local, H, Dv) in q's dtype, or ``(o, final_state)`` (float32; float64 for float64 input).
        Gradient conventions as ``lasp2_linear_attention``.

    Bytes sent per rank: see the module docstring (one state per direction, plus the final state's
    distribution and its gradients' collection with ``output_final_state``).

    Raises:
        ValueError: see ``seqpar.collectives.lasp2.prepare_linear_sp``, or a bad ``num_pieces``; on every rank
            given the bad input, before any communication.
    """
    if isinstance(q, torch.Tensor) and q.dim() == 4:  # before prepare_linear_sp's agreement check
        piece_sizes(q.shape[-1], num_pieces)
    sp = prepare_linear_sp(q, k, v, log_decay, initial_state, group=group, scale=scale, layout=layout,
                           backend=backend, op="zeco_linear_attention",
                           extra=f"output_final_state={bool(output_final_state)} num_pieces={num_pieces}")
    o, final = _Zeco.apply(q, k, v, log_decay, initial_state, sp, bool(output_final_state), backend, num_pieces)
    return (o, final) if output_final_state else o
