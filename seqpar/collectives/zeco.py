"""ZeCO (Chou et al. 2025, arXiv 2507.01004): linear-attention SP over the pipelined All-Scan.

Same math and notation as ``seqpar.collectives.lasp2`` (M_r, D_r, S_in(r), L_r, a_r). Where LASP-2 gathers
every rank's state on every rank, ZeCO passes one state along the chain: rank r receives exactly S_in(r)
(``seqpar.collectives.scan``), so per rank the bytes are one state whatever P is.

How the compute overlaps the scan (the paper's schedule; one thread per rank, asynchronous point-to-point):

* forward: the state pass (M_r, D_r: O(S Dk Dv), cheap); then the scan starts: rank 0 sends all its pieces at
  once, every other rank's relay thread (``scan.ScanRelay``) forwards piece j (exp(D_r) S_in(r)[j] + M_r[j])
  as soon as it has arrived, while the rank runs the intra-chunk work (the output pass, O(S C D)), so the scan
  travels down the chain while every rank computes, and the inter term's decayed queries (no state needed).
  Then the relay is joined and one einsum per sequence adds the inter term with the whole S_in(r).
* backward: L_r (one einsum) is computed; the reverse scan starts (rank P - 1 sends a_{P-1} = L_{P-1} +
  exp(D_{P-1}) a_P at once; the others relay on their thread); the gradients through the output pass and
  the inter term (S_in(r) is known) run meanwhile; then the relay is joined, then the gradients through M_r
  and D_r.

Piece count (``scan.choose_pieces``): K = sqrt((P - 2) * state bytes / (latency x bandwidth)), clamped to
[1, Dk], with the link's latency-bandwidth product (``scan.link_latency_bytes``: the emulated link's, else
``scan.LATENCY_BYTES``), so the last rank has its state after about one whole-state transfer plus small-piece
hops (not P - 1 whole-state hops, nor, at P = 256 with a fixed 8 pieces, ~33 state times).

The final state (``output_final_state``) leaves rank P - 1 by a binomial tree: rank P - 1 - rel receives from
its parent (rel with its highest bit cleared) and sends to rel + 2^j for every 2^j > rel, so it reaches every
rank after ceil(log2 P) hops and no rank sends more than ceil(log2 P) states. Its gradients are summed up the
same tree (every rank but P - 1 sends one state) before the reverse scan starts from rank P - 1.

Bytes sent per rank (N = B*H*Dk*Dv, N_seq for B packed; e = 8 for float64 input, else 4; 0 when P = 1):

    forward  = [r < P-1] * N * e                          (All-Scan: one state)
             + [output_final_state] * children(r) * N * e  (the final state's tree; children(P-1) = ceil(log2 P))
    backward = [r > 0] * N * e                            (reverse All-Scan: one state)
             + [output_final_state] * [r < P-1] * N * e    (each rank's final-state gradient (sum) to its parent)

Independent of the sequence length and of the decay kind (the decay never travels).

Gradient conventions: as LASP-2 (partial gradients of whole-held inputs, summed over ranks for the full
gradient; the final state's gradients from all ranks are summed).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from seqpar import tracing
from seqpar.collectives import comm
from seqpar.collectives.lasp2 import LinearSP, LocalPass, keeps_own_graph, prepare_linear_sp
from seqpar.collectives.scan import ScanRelay, choose_pieces, link_latency_bytes, piece_sizes

__all__ = ["INTRA_PIECES", "final_state_tree", "zeco_linear_attention"]

TAG_FINAL_STATE = comm.tags.ZECO_FINAL_STATE  # the final state, down the tree from rank P-1
TAG_FINAL_GRAD = comm.tags.ZECO_FINAL_GRAD  # its gradients, summed up the tree to rank P-1
INTRA_PIECES = 1
"""Pieces the intra-chunk work of each sequence runs in (chunk-aligned), with ``ScanRelay.progress`` calls
between them. One: the relay runs on its own thread and needs no checkpoints in the compute."""


def final_state_tree(rank: int, world_size: int) -> tuple[int | None, list[int]]:
    """(parent, children) of ``rank`` in the binomial tree rooted at rank P - 1: in relative numbering
    rel = P - 1 - rank, the parent clears rel's highest bit and the children are rel + 2^j for 2^j > rel."""
    rel = world_size - 1 - rank
    parent = None if rel == 0 else world_size - 1 - (rel - (1 << (rel.bit_length() - 1)))
    children, j = [], rel.bit_length()
    while rel + (1 << j) < world_size:
        children.append(world_size - 1 - (rel + (1 << j)))
        j += 1
    return parent, children


def _pieces(sp: LinearSP, num_pieces: int | None) -> int:
    e = torch.finfo(sp.cdt).bits // 8
    return num_pieces if num_pieces is not None else choose_pieces(
        sp.world_size, math.prod(sp.state_shape) * e, sp.shape[3], latency_bytes=link_latency_bytes())


class _Zeco(torch.autograd.Function):
    @staticmethod
    @keeps_own_graph
    def forward(ctx, q, k, v, log_decay, initial_state, sp: LinearSP, output_final_state: bool,
                num_pieces: int | None):
        pieces = _pieces(sp, num_pieces)
        relay = ScanRelay(sp.state_shape, sp.cdt, q.device, group=sp.group, num_pieces=pieces)
        parent, children = final_state_tree(sp.rank, sp.world_size)
        final_recv = None
        if output_final_state and parent is not None:
            buf = torch.empty(sp.state_shape, dtype=sp.cdt, device=q.device)
            final_recv = comm.recv(buf, parent, group=sp.group, tag=TAG_FINAL_STATE)
        local = LocalPass(q, k, v, log_decay, initial_state, sp, ctx.needs_input_grad,
                          pieces_per_sequence=INTRA_PIECES)
        tracing.record("kernel", name="zeco.local_state")
        m, d = local.states()
        start_from = None if local.folds_initial else initial_state  # folded: rank 0's M is its outgoing state
        relay.start(m, d, initial_state=start_from)  # the scan starts: the first rank sends everything now
        tracing.record("kernel", name="zeco.intra")
        for i in range(len(local.pieces)):
            local.output(i)
            relay.progress()
        takes_state = sp.rank > 0 or start_from is not None
        if takes_state:  # the inter term's queries need no state: still while the scan travels
            local.inter_queries()
        s_in, s_out = relay.complete()
        final, final_sends = None, []
        if output_final_state and parent is None:  # s_out is the whole sequence's final state: down the tree
            final = s_out
            final_sends = [comm.send(final, c, group=sp.group, tag=TAG_FINAL_STATE) for c in children]
        tracing.record("kernel", name="zeco.inter")
        o = local.finish(s_in if takes_state else None)  # rank 0: no inter term
        if final_recv is not None:
            final = final_recv.wait()
            final_sends = [comm.send(final, c, group=sp.group, tag=TAG_FINAL_STATE) for c in children]
        relay.finish()
        for pending in final_sends:
            pending.wait()
        ctx.sp, ctx.local, ctx.output_final_state, ctx.pieces = sp, local, output_final_state, pieces
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.d = d
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        sp: LinearSP = ctx.sp
        local: LocalPass = ctx.local
        # the reverse scan comes down the chain (relayed on a thread) while we compute
        relay = ScanRelay(sp.state_shape, sp.cdt, do.device, group=sp.group, num_pieces=ctx.pieces, reverse=True)
        d_final, grad_send = None, None
        if ctx.output_final_state:  # a_P = the sum of every rank's final-state gradient, summed up the tree
            parent, children = final_state_tree(sp.rank, sp.world_size)
            d_final = torch.zeros(sp.state_shape, dtype=sp.cdt, device=do.device) if dfinal is None else (
                dfinal.to(sp.cdt))
            grad_recvs = [comm.recv(torch.empty_like(d_final), c, group=sp.group, tag=TAG_FINAL_GRAD)
                          for c in children]
            for pending in grad_recvs:
                d_final = d_final + pending.wait()
            if parent is not None:
                grad_send = comm.send(d_final, parent, group=sp.group, tag=TAG_FINAL_GRAD)
        l_r = local.incoming_state_grad(do)
        # reverse All-Scan: receive a_{r+1}, send a_r = L_r + exp(D_r) a_{r+1} to rank r - 1
        relay.start(l_r, ctx.d, initial_state=d_final)
        tracing.record("kernel", name="zeco.intra_backward")
        for i in range(len(local.pieces)):
            local.output_grads(i, do)
            relay.progress()
        local.inter_grads(do)  # needs nothing from the scan either
        a_next, a_here = relay.complete()
        tracing.record("kernel", name="zeco.state_backward")
        local.state_grads(a_next, do)
        grads = local.input_grads()
        relay.finish()
        if grad_send is not None:
            grad_send.wait()
        d_init = None
        if ctx.initial_dtype is not None and ctx.needs_input_grad[4]:  # whole-held: all of a_0 on rank 0
            if sp.rank != 0:
                d_init = torch.zeros_like(a_here)
            else:
                d_init = local.initial_state_grad() if local.folds_initial else a_here
            d_init = d_init.to(ctx.initial_dtype)
        ctx.local = None  # free the graphs
        return (*grads, d_init, None, None, None)


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
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    layout: str = "contiguous",
    num_pieces: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel linear attention by ZeCO: the incoming state arrives by a pipelined All-Scan.

    Args:
        q, k: (B, S_local, H, Dk) local shards (contiguous layout); v: (B, S_local, H, Dv).
        log_decay: None, (H,) per-head (the same whole tensor on every rank), (B, S_local, H) per token or
            (B, S_local, H, Dk) per token and key dimension (GLA) (local shards); all <= 0 and finite.
        scale: default 1 / sqrt(Dk).
        initial_state: (B, H, Dk, Dv) ((N_seq, H, Dk, Dv) packed), the state before rank 0's first token (the
            same on every rank).
        output_final_state: also return the whole sequence's final state (B, H, Dk, Dv) ((N_seq, ...) packed),
            on every rank (rank P-1 has it after the scan and sends it down a binomial tree).
        cu_seqlens: a packed batch, as ``lasp2_linear_attention``: one scan carries all N_seq states.
        chunk_size: the chunked kernel's chunk length.
        layout: must be ``"contiguous"``.
        num_pieces: pieces along Dk the state travels in (default ``scan.choose_pieces`` from P, the state's
            bytes, Dk and the link's latency-bandwidth product).
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
                           backend=backend, op="zeco_linear_attention", cu_seqlens=cu_seqlens,
                           chunk_size=chunk_size,
                           extra=f"output_final_state={bool(output_final_state)} num_pieces={num_pieces}")
    o, final = _Zeco.apply(q, k, v, log_decay, initial_state, sp, bool(output_final_state), num_pieces)
    return (o, final) if output_final_state else o
