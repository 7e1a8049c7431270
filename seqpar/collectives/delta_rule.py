"""Delta-rule linear attention SP (Gated DeltaNet, Kimi Delta Attention): LASP-2 and ZeCO over an affine state map.

Recurrence (``seqpar.kernels.delta_rule``; state S (Dk, Dv) per head, transformers' layout):

    S_t = (I - beta_t k_t k_t^T) G_t S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t.

Unlike the additive states of ``lasp2`` / ``zeco`` the state is rewritten, not only decayed, so a rank's slice
maps the state entering it affinely: S_out(r) = A_r S_in(r) + B_r with A_r (Dk, Dk) per head and B_r the
slice's state from zero. Every rank first computes, locally and in parallel (``delta_rule_transition``, one
chunked pass with Dk extra value columns), its outputs from a zero state o0, the read-out w (o = o0 + w^T
S_in), A_r and B_r. Then the states entering the ranks,

    S_in(0) = initial_state (or 0),     S_in(r + 1) = A_r S_in(r) + B_r,

come from one of two collectives, and o = o0 + w^T S_in(r):

* ``lasp2_delta_rule``: ONE all-gather of (A_r, B_r); every rank folds the earlier ranks' maps (and, for the
  final state, the later ones too). One collective latency; bytes grow with P.
* ``zeco_delta_rule``: the All-Scan (``scan.ScanRelay``): rank r receives S_in(r) from rank r - 1, applies its
  map and forwards the result, in K pieces along Dv (columns of S are independent under S -> A S + B), so the
  last rank has its state after P - 1 + K - 1 piece hops. One state per rank whatever P is; the final state
  leaves rank P - 1 down ``zeco.final_state_tree``.

Backward (the adjoint, right to left): lambda_r = dL/dS_in(r) obeys lambda_r = L_r + A_r^T lambda_{r+1},
lambda_P = the sum of every rank's final-state gradient, with L_r = sum_t w_t do_t^T what rank r's outputs ask
of S_in(r). Then dB_r = lambda_{r+1} and dA_r = lambda_{r+1} S_in(r)^T, and autograd carries them (with do for
o0 and w) through the local chunked pass. LASP-2 all-gathers (L_r[, dF_r]) and folds with the A_j it gathered
in the forward; ZeCO runs the scan in reverse (rank r receives lambda_{r+1}, sends lambda_r).

Bytes sent per rank (e = 8 for float64 input, else 4: everything travels in the compute dtype; N = B*H*Dk*Dv,
N_A = B*H*Dk*Dk; 0 when P = 1):

    lasp2_delta_rule   forward  = (P - 1) * (N_A + N) * e
                       backward = (P - 1) * (1 + [output_final_state]) * N * e
    zeco_delta_rule    forward  = [r < P-1] * N * e + [output_final_state] * children(r) * N * e
                       backward = [r > 0] * N * e + [output_final_state] * [r < P-1] * N * e

(children(r): rank r's children in the final state's binomial tree, ceil(log2 P) on rank P - 1.) Which wins:
the transition A_r makes LASP-2's forward (1 + Dk/Dv) states per peer, so at Dk = Dv it sends 2 (P - 1) states
where ZeCO sends one; LASP-2 still wins where a collective's one latency beats P - 1 + K - 1 dependent hops,
i.e. small P (2-4) or small states (per-state transfer time under ~P link latencies); ZeCO wins at large P or
large states (bench/results/delta_rule_sp.json).

Gradient conventions (as ``lasp2``): ``initial_state`` (whole on every rank) gets this rank's partial gradient,
the whole of it on rank 0 and zeros elsewhere; the final state (the same on every rank) has its gradients summed
over the ranks. Ranks may hold different lengths. Packed batches (``cu_seqlens``): every sequence has a piece on
every rank; the local pass runs per sequence and ONE collective carries all N_seq maps (B = N_seq above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar import tracing
from seqpar.collectives import comm
from seqpar.collectives.scan import ScanRelay, choose_pieces, piece_sizes
from seqpar.collectives.zeco import TAG_FINAL_GRAD, TAG_FINAL_STATE, final_state_tree
from seqpar.kernels.delta_rule import delta_rule_transition, validate_delta_rule_inputs
from seqpar.kernels.varlen import validate_cu_seqlens

__all__ = ["lasp2_delta_rule", "zeco_delta_rule"]


@dataclass(frozen=True)
class DeltaSP:
    """One call's checked arguments."""

    group: dist.ProcessGroup
    rank: int
    world_size: int
    scale: float
    cdt: torch.dtype
    state_shape: tuple[int, int, int, int]  # B (N_seq packed), H, Dk, Dv
    chunk_size: int
    segments: tuple[tuple[int, int], ...]  # local token range of each sequence; ((0, S_local),) unpacked
    packed: bool


def _prepare(q, k, v, beta, log_decay, initial_state, *, group, scale, layout, op, chunk_size, extra,
             cu_seqlens=None) -> DeltaSP:
    """Check one call, locally and identically on every rank, before any communication (host syncs: the
    log_decay value check; reading ``cu_seqlens``). Raises ValueError naming the argument (see
    ``lasp2_delta_rule``)."""
    if layout != "contiguous":
        raise ValueError(f"layout: delta-rule SP needs the 'contiguous' layout (the state flows from rank r to "
                         f"r + 1), got {layout!r}")
    packed = cu_seqlens is not None
    validate_delta_rule_inputs(q, k, v, beta, log_decay, None if packed else initial_state)
    segments = ((0, q.shape[1]),)
    if packed:
        if q.shape[0] != 1:
            raise ValueError(f"q: a packed batch (cu_seqlens) has batch size 1, got {q.shape[0]}")
        bounds = validate_cu_seqlens(cu_seqlens, q.shape[1])
        segments = tuple(zip(bounds, bounds[1:]))
        want = (len(segments), q.shape[2], q.shape[3], v.shape[-1])
        if initial_state is not None and tuple(getattr(initial_state, "shape", ())) != want:
            raise ValueError(f"initial_state: expected (N_seq, H, Dk, Dv) = {want} for a packed batch, got "
                             f"{tuple(getattr(initial_state, 'shape', ()))}")
    if initial_state is not None and (not initial_state.dtype.is_floating_point or initial_state.device != q.device):
        raise ValueError(f"initial_state: expected a floating-point tensor on q's device ({q.device})")
    b, s, h, dk = q.shape
    if s == 0:
        raise ValueError("q: the local sequence is empty")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an int >= 1, got {chunk_size!r}")
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    group, rank, size = comm.group_info(group)
    kind = "none" if log_decay is None else ("head" if log_decay.dim() == 3 else "key")
    fields = {"op": op, "q shape": (b, "S", h, dk), "v shape": (b, "S", h, v.shape[-1]), "dtype": q.dtype,
              "scale": scale, "decay kind": kind, "chunk_size": chunk_size,
              "sequences": len(segments) if packed else None}
    fields.update(item.split("=", 1) for item in extra.split())
    comm.check_agreement(op, fields, group=group, contents={"initial_state": initial_state})
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return DeltaSP(group, rank, size, scale, cdt, (len(segments) if packed else b, h, dk, v.shape[-1]), chunk_size,
                   segments, packed)


def _apply(a: torch.Tensor, state: torch.Tensor | None, add: torch.Tensor) -> torch.Tensor:
    """a @ state + add (state None: zero)."""
    return add if state is None else a @ state + add


# ----------------------------------------------------------------------------------------------------
# LASP-2: one all-gather of (A_r, B_r)
# ----------------------------------------------------------------------------------------------------


class _GatherScan(torch.autograd.Function):
    """(A_r, B_r, initial) -> (S_in(r), final state or None) by one all-gather; backward by one all-gather of
    (L_r[, dF_r])."""

    @staticmethod
    def forward(ctx, a, m, initial, sp: DeltaSP, output_final_state: bool):
        n_a = a.numel()
        payload = torch.cat([a.reshape(-1), m.reshape(-1)])
        gathered = comm.all_gather(payload, group=sp.group) if sp.world_size > 1 else payload[None]
        maps = gathered[:, :n_a].reshape(sp.world_size, *a.shape)
        states = gathered[:, n_a:].reshape(sp.world_size, *m.shape)
        s = None if initial is None else initial.to(sp.cdt).clone()
        for j in range(sp.rank):  # S_in(j + 1) = A_j S_in(j) + B_j
            s = _apply(maps[j], s, states[j])
        s_in = torch.zeros_like(m) if s is None else s
        final = None
        if output_final_state:  # every rank folds on through the later ranks: the same final state everywhere
            final = s_in
            for j in range(sp.rank, sp.world_size):
                final = _apply(maps[j], final, states[j])
        ctx.sp, ctx.output_final_state = sp, output_final_state
        ctx.initial_dtype = None if initial is None else initial.dtype
        ctx.save_for_backward(maps, s_in)
        return s_in, final

    @staticmethod
    def backward(ctx, d_in, d_final):
        sp: DeltaSP = ctx.sp
        maps, s_in = ctx.saved_tensors
        n = s_in.numel()
        l_r = torch.zeros_like(s_in) if d_in is None else d_in.to(sp.cdt)
        parts = [l_r.reshape(-1)]
        if ctx.output_final_state:  # an unused final state on this rank: its gradient is zero (and still travels)
            parts.append((torch.zeros_like(s_in) if d_final is None else d_final.to(sp.cdt)).reshape(-1))
        payload = torch.cat(parts) if len(parts) > 1 else parts[0]
        gathered = comm.all_gather(payload, group=sp.group) if sp.world_size > 1 else payload[None]
        l_all = gathered[:, :n].reshape(sp.world_size, *s_in.shape)
        # lambda_P = sum of the final-state gradients; lambda_j = L_j + A_j^T lambda_{j+1}, down to r + 1
        lam = gathered[:, n:].sum(0).reshape(s_in.shape) if ctx.output_final_state else torch.zeros_like(s_in)
        for j in range(sp.world_size - 1, sp.rank, -1):
            lam = l_all[j] + maps[j].mT @ lam
        d_a, d_m = lam @ s_in.mT, lam
        d_init = None
        if ctx.initial_dtype is not None and ctx.needs_input_grad[2]:
            d_init = (l_r + maps[0].mT @ lam if sp.rank == 0 else torch.zeros_like(s_in)).to(ctx.initial_dtype)
        return d_a, d_m, d_init, None, None


# ----------------------------------------------------------------------------------------------------
# ZeCO: the All-Scan carrying S through the affine maps
# ----------------------------------------------------------------------------------------------------


class AffineScanRelay(ScanRelay):
    """``ScanRelay`` for affine maps on transposed states X = S^T (..., Dv, Dk), pieces along Dv:
    outgoing = incoming @ matrix + mine (forward: matrix = A_r^T; reverse, the adjoint: matrix = A_r)."""

    def start(self, local_state, matrix, *, initial_state=None) -> None:  # type: ignore[override]
        self._matrix = matrix.detach()
        super().start(local_state, None, initial_state=initial_state)

    def _forward_piece(self, j: int, incoming: torch.Tensor) -> None:
        start = sum(self.sizes[:j])
        mine = self._mine[..., start:start + self.sizes[j], :].to(self.dtype)
        outgoing = (incoming @ self._matrix + mine).contiguous()
        if self.dst is not None:
            self._sent.append(outgoing)
            self._sends.append(
                comm.send(outgoing, self.dst, group=self.group, tag=self.tag + j, direction=self.direction))
        self._ins.append(incoming)
        self._outs.append(outgoing)


class _RelayScan(torch.autograd.Function):
    """(A_r, B_r, initial) -> (S_in(r), final state or None) by the pipelined All-Scan; backward by the
    reverse scan (and the final state's gradients summed up its tree first)."""

    @staticmethod
    def forward(ctx, a, m, initial, sp: DeltaSP, output_final_state: bool, num_pieces: int):
        b, h, dk, dv = sp.state_shape
        relay = AffineScanRelay((b, h, dv, dk), sp.cdt, m.device, group=sp.group, num_pieces=num_pieces)
        parent, children = final_state_tree(sp.rank, sp.world_size)
        final_recv = None
        if output_final_state and parent is not None:
            final_recv = comm.recv(torch.empty(b, h, dv, dk, dtype=sp.cdt, device=m.device), parent,
                                   group=sp.group, tag=TAG_FINAL_STATE)
        start = None if initial is None else initial.to(sp.cdt).mT.contiguous()
        relay.start(m.mT, a.mT, initial_state=start)
        s_in_t, s_out_t = relay.complete()
        final_t, sends = None, []
        if output_final_state:
            final_t = s_out_t if parent is None else final_recv.wait()
            sends = [comm.send(final_t, c, group=sp.group, tag=TAG_FINAL_STATE) for c in children]
        relay.finish()
        for pending in sends:
            pending.wait()
        ctx.sp, ctx.output_final_state, ctx.num_pieces = sp, output_final_state, num_pieces
        ctx.initial_dtype = None if initial is None else initial.dtype
        s_in = s_in_t.mT.contiguous()
        ctx.save_for_backward(a, s_in)
        return s_in, None if final_t is None else final_t.mT.contiguous()

    @staticmethod
    def backward(ctx, d_in, d_final):
        sp: DeltaSP = ctx.sp
        a, s_in = ctx.saved_tensors
        b, h, dk, dv = sp.state_shape
        relay = AffineScanRelay((b, h, dv, dk), sp.cdt, s_in.device, group=sp.group, num_pieces=ctx.num_pieces,
                                reverse=True)
        lam_last, grad_send = None, None
        if ctx.output_final_state:  # lambda_P = the sum of every rank's final-state gradient, up the tree
            parent, children = final_state_tree(sp.rank, sp.world_size)
            total = torch.zeros_like(s_in) if d_final is None else d_final.to(sp.cdt)
            recvs = [comm.recv(torch.empty_like(total), c, group=sp.group, tag=TAG_FINAL_GRAD) for c in children]
            for pending in recvs:
                total = total + pending.wait()
            if parent is not None:
                grad_send = comm.send(total.contiguous(), parent, group=sp.group, tag=TAG_FINAL_GRAD)
            lam_last = total.mT.contiguous()
        l_r = torch.zeros_like(s_in) if d_in is None else d_in.to(sp.cdt)
        # reverse scan: receive lambda_{r+1}, send lambda_r = L_r + A_r^T lambda_{r+1} (transposed: @ A_r)
        relay.start(l_r.mT, a, initial_state=lam_last)
        lam_next_t, lam_here_t = relay.complete()
        relay.finish()
        if grad_send is not None:
            grad_send.wait()
        lam_next = lam_next_t.mT
        d_init = None
        if ctx.initial_dtype is not None and ctx.needs_input_grad[2]:
            d_init = (lam_here_t.mT if sp.rank == 0 else torch.zeros_like(s_in)).to(ctx.initial_dtype)
        return lam_next @ s_in.mT, lam_next.contiguous(), d_init, None, None, None


# ----------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------


def _run(scan, q, k, v, beta, log_decay, initial_state, sp: DeltaSP, output_final_state, *scan_args):
    """The local pass per sequence, ONE scan for all of them (packed: the states are (N_seq, H, Dk, Dv)), the
    read-out of each sequence's entering state."""
    tracing.record("kernel", name="delta_rule.local")
    parts = [delta_rule_transition(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b],
                                   log_decay=None if log_decay is None else log_decay[:, a:b], scale=sp.scale,
                                   chunk_size=sp.chunk_size) for a, b in sp.segments]
    a = torch.cat([p[2] for p in parts], 0) if sp.packed else parts[0][2]
    m = torch.cat([p[3] for p in parts], 0) if sp.packed else parts[0][3]
    s_in, final = scan.apply(a, m, initial_state, sp, bool(output_final_state), *scan_args)
    tracing.record("kernel", name="delta_rule.inter")
    outs = [o0 + torch.einsum("bshk,bhkv->bshv", w, s_in[j:j + 1] if sp.packed else s_in)
            for j, (o0, w, _, _) in enumerate(parts)]
    o = (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).to(q.dtype)
    return (o, final) if output_final_state else o


def lasp2_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    layout: str = "contiguous",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel gated delta rule by LASP-2: one all-gather of every rank's affine state map.

    Args:
        q, k: (B, S_local, H, Dk) local shards (contiguous layout; ranks may hold different lengths), keys
            normalised by the caller as the model does; v: (B, S_local, H, Dv); beta: (B, S_local, H).
        log_decay: None (DeltaNet), (B, S_local, H) (Gated DeltaNet) or (B, S_local, H, Dk) (KDA); <= 0, finite.
        scale: default 1 / sqrt(Dk).
        initial_state: (B, H, Dk, Dv) ((N_seq, H, Dk, Dv) packed), the state before rank 0's first token (the
            same on every rank).
        output_final_state: also return the whole sequence's final state (B, H, Dk, Dv) ((N_seq, ...) packed),
            on every rank.
        cu_seqlens: a packed batch (B = 1): int32 local boundaries [0, ..., S_local] of N_seq sequences, each cut
            in P parts (``seqpar.shard_sequence``) so that every sequence has tokens on every rank; states reset
            at the boundaries; ONE collective carries every sequence's map (N_seq for B in the byte formulas).
        chunk_size: the local chunked kernel's chunk length.
        layout: must be ``"contiguous"``.

    Returns:
        o (B, S_local, H, Dv) in q's dtype, or ``(o, final_state)`` (float32; float64 for float64 input).

    Bytes sent per rank: forward ``(P-1) (B H Dk Dk + B H Dk Dv) e``, backward ``(P-1) (1 + [output_final_state])
    B H Dk Dv e`` (e = 8 for float64 input, else 4).

    Raises:
        ValueError: naming the argument, on every rank given the bad input, before any communication: a layout
            other than contiguous, shapes that do not fit, an empty local sequence, log_decay > 0 or not finite,
            a bad chunk_size or scale; and, on every rank, when the ranks disagree on shapes, dtype, options or
            the initial state's contents (``comm.check_agreement``).
    """
    sp = _prepare(q, k, v, beta, log_decay, initial_state, group=group, scale=scale, layout=layout,
                  op="lasp2_delta_rule", chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                  extra=f"output_final_state={bool(output_final_state)}")
    return _run(_GatherScan, q, k, v, beta, log_decay, initial_state, sp, output_final_state)


def zeco_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel gated delta rule by ZeCO's All-Scan: the entering state arrives from rank r - 1 in
    pieces along Dv, each forwarded through this rank's affine map as soon as it arrives.

    Args: as ``lasp2_delta_rule``, plus ``num_pieces``: pieces along Dv the state travels in (default
    ``scan.choose_pieces(P, state bytes, Dv)``).

    Returns: as ``lasp2_delta_rule``.

    Bytes sent per rank: forward ``[r < P-1] N e`` (+ the final state down its tree), backward ``[r > 0] N e``
    (+ ``[r < P-1] N e`` with ``output_final_state``), N = B H Dk Dv.

    Raises:
        ValueError: as ``lasp2_delta_rule``, or ``num_pieces`` not in [1, min(Dv, scan.MAX_PIECES)].
    """
    if isinstance(v, torch.Tensor) and v.dim() == 4:
        piece_sizes(v.shape[-1], num_pieces)
    sp = _prepare(q, k, v, beta, log_decay, initial_state, group=group, scale=scale, layout=layout,
                  op="zeco_delta_rule", chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                  extra=f"output_final_state={bool(output_final_state)} num_pieces={num_pieces}")
    if num_pieces is None:
        e = torch.finfo(sp.cdt).bits // 8
        num_pieces = choose_pieces(sp.world_size, math.prod(sp.state_shape) * e, sp.state_shape[3])
    return _run(_RelayScan, q, k, v, beta, log_decay, initial_state, sp, output_final_state, num_pieces)
