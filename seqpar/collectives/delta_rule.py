"""Delta-rule linear attention SP (Gated DeltaNet, Kimi Delta Attention): LASP-2 and ZeCO over an affine state map.

Recurrence (``seqpar.kernels.delta_rule``; state S (Dk, Dv) per head, transformers' layout):

    S_t = (I - beta_t k_t k_t^T) G_t S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t.

Unlike the additive states of ``lasp2`` / ``zeco`` the state is rewritten, not only decayed, so a rank's slice
maps the state entering it affinely: S_out(r) = A_r S_in(r) + B_r with A_r (Dk, Dk) per head and B_r the
slice's state from zero. Every rank computes, locally and in parallel, with Dk extra value columns (the
values [V | 0] from the state [0 | I], as ``delta_rule_transition``): first the state pass
(``delta_rule_chunk_states``: the WY/UT solves and the chunk recurrence; its final state is [B_r | A_r]), then
starts the transfer, then, while it travels, the output pass (``delta_rule_chunk_outputs``: the intra-chunk
attention) giving its outputs from a zero state o0 and the read-out w (o = o0 + w^T S_in). The states entering
the ranks,

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
of S_in(r). Then dB_r = lambda_{r+1} and dA_r = lambda_{r+1} S_in(r)^T. L_r's transfer is issued first; the
output pass's backward (it needs only do and S_in) runs while it travels; the state pass's backward, given
(dB_r, dA_r) and what the output pass's backward left for its states and new values, comes last. LASP-2
all-gathers (L_r[, dF_r]) and folds with the A_j it gathered in the forward; ZeCO runs the scan in reverse
(rank r receives lambda_{r+1}, sends lambda_r).

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
from seqpar.collectives.lasp2 import keeps_own_graph
from seqpar.collectives.scan import ScanRelay, choose_pieces, link_latency_bytes, piece_sizes
from seqpar.collectives.zeco import TAG_FINAL_GRAD, TAG_FINAL_STATE, final_state_tree
from seqpar.kernels.delta_rule import delta_rule_chunk_outputs, delta_rule_chunk_states, validate_delta_rule_inputs
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


def _leaf(t: torch.Tensor | None, need: bool) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(need)


def _grads(outputs, grad_outputs, inputs) -> list[torch.Tensor | None]:
    """d(outputs)/d(inputs) weighted by grad_outputs, None for inputs that need none or are not reached."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None and o.requires_grad]
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    if not pairs or not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(got) if x is not None and x.requires_grad else None for x in inputs]


# ----------------------------------------------------------------------------------------------------
# The local pass, in the steps the ops interleave with the transfer
# ----------------------------------------------------------------------------------------------------


class _LocalPass:
    """This rank's delta rule as an affine function of its entering state, in two passes kept as autograd
    graphs from the forward (the backward runs each op's backward once, no recomputation):

    * ``transition()``: the state pass (``delta_rule_chunk_states``: the WY/UT solves and the chunk recurrence)
      over the values widened by Dk zero columns from the state [0 | I]: its final state is [B_r | A_r];
    * ``outputs()``: the output pass (``delta_rule_chunk_outputs``: the intra-chunk attention and the read-out
      of the chunks' states), giving [o0 | w] with o = o0 + w^T S_in; its entering states and new values are
      leaves of their own, so its backward stops there and leaves the state pass to ``state_grads``;
    * ``finish(s_in)``: o.

    The ops start the transfer of (A_r, B_r) between the two passes. Backward: ``incoming_state_grad(do)``
    (L_r = sum_t w_t do_t^T), ``output_grads(do)`` (needs only do and S_in: it runs while L travels), then
    ``state_grads(lam)`` given lambda_{r+1} = dL/dS_out and ``input_grads()``."""

    def __init__(self, q, k, v, beta, log_decay, sp: DeltaSP, needs) -> None:
        self.sp = sp
        self.inputs = (q, k, v, beta, log_decay)
        self.grad = any(needs[:5])  # graphs only where a gradient is needed
        self.Q, self.K, self.V, self.Beta, self.G = (_leaf(t, n) for t, n in zip(self.inputs, needs))

    def _seg(self, x: torch.Tensor | None, j: int) -> torch.Tensor | None:
        a, b = self.sp.segments[j]
        return None if x is None else x[:, a:b]

    def transition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_r, B_r): (B or N_seq, H, Dk, Dk) and (B or N_seq, H, Dk, Dv), compute dtype, detached."""
        sp = self.sp
        bsz, h, dk, dv = sp.state_shape
        rows = 1 if sp.packed else bsz
        eye = torch.eye(dk, dtype=sp.cdt, device=self.K.device).expand(rows, h, dk, dk)
        start = torch.cat([torch.zeros(rows, h, dk, dv, dtype=sp.cdt, device=self.K.device), eye], -1)
        self.states, self.new_values, finals = [], [], []
        with torch.set_grad_enabled(self.grad):
            for j in range(len(sp.segments)):
                v = self._seg(self.V, j).to(sp.cdt)
                widened = torch.cat([v, v.new_zeros(*v.shape[:3], dk)], -1)
                states, u, final = delta_rule_chunk_states(
                    self._seg(self.K, j).to(sp.cdt), widened, self._seg(self.Beta, j).to(sp.cdt),
                    log_decay=self._seg(self.G, j), initial_state=start, chunk_size=sp.chunk_size)
                self.states.append(states)
                self.new_values.append(u)
                finals.append(final)
            self.final = torch.cat(finals, 0) if len(finals) > 1 else finals[0]  # [B_r | A_r]
        final = self.final.detach()
        return final[..., dv:], final[..., :dv]

    def outputs(self) -> None:
        """[o0 | w] per sequence from the state pass's entering states and new values (the intra-chunk work)."""
        sp = self.sp
        self.state_leaves, self.value_leaves, self.wide = [], [], []
        with torch.set_grad_enabled(self.grad):
            for j in range(len(sp.segments)):
                states, u = _leaf(self.states[j], self.grad), _leaf(self.new_values[j], self.grad)
                self.wide.append(delta_rule_chunk_outputs(
                    self._seg(self.Q, j).to(sp.cdt), self._seg(self.K, j).to(sp.cdt), states, u,
                    log_decay=self._seg(self.G, j), scale=sp.scale, chunk_size=sp.chunk_size))
                self.state_leaves.append(states)
                self.value_leaves.append(u)

    def _state_of(self, s: torch.Tensor, j: int) -> torch.Tensor:
        return s[j:j + 1] if self.sp.packed else s

    def finish(self, s_in: torch.Tensor) -> torch.Tensor:
        """o (B, S_local, H, Dv) in q's dtype: o0 + w^T S_in per sequence."""
        dv = self.sp.state_shape[3]
        self.s_in = s_in
        with torch.no_grad():
            outs = [wide[..., :dv] + torch.einsum("bshk,bhkv->bshv", wide[..., dv:], self._state_of(s_in, j))
                    for j, wide in enumerate(self.wide)]
        o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return o.to(self.inputs[0].dtype)

    # ---- backward ----

    def incoming_state_grad(self, do: torch.Tensor) -> torch.Tensor:
        """L_r = sum_t w_t do_t^T per sequence: what this rank's outputs ask of S_in."""
        dv = self.sp.state_shape[3]
        parts = [torch.einsum("bshk,bshv->bhkv", wide.detach()[..., dv:], self._seg(do, j).to(self.sp.cdt))
                 for j, wide in enumerate(self.wide)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def output_grads(self, do: torch.Tensor) -> None:
        """Backward of the output pass: d[o0 | w] = [do | S_in do^T]; kept for ``state_grads`` / ``input_grads``."""
        sp = self.sp
        grads = []
        for j in range(len(sp.segments)):
            d = self._seg(do, j).to(sp.cdt)
            grads.append(torch.cat([d, torch.einsum("bshv,bhkv->bshk", d, self._state_of(self.s_in, j))], -1))
        n = len(sp.segments)
        got = _grads(self.wide, grads, [self.Q, self.K, self.G, *self.state_leaves, *self.value_leaves])
        self.out_grads = got[:3]
        self.d_states, self.d_values = got[3:3 + n], got[3 + n:]
        self.wide = self.state_leaves = self.value_leaves = None

    def state_grads(self, lam: torch.Tensor) -> None:
        """Backward of the state pass given lambda_{r+1} (dL/dS_out): d[B_r | A_r] = [lam | lam S_in^T]."""
        outputs = [self.final, *self.states, *self.new_values]
        grad_outputs = [torch.cat([lam, lam @ self.s_in.mT], -1), *self.d_states, *self.d_values]
        self.state_pass_grads = _grads(outputs, grad_outputs, [self.K, self.V, self.Beta, self.G])
        self.final = self.states = self.new_values = None

    def input_grads(self) -> list[torch.Tensor | None]:
        """(dq, dk, dv, dbeta, dlog_decay) in the inputs' dtypes."""
        dq, dk_out, dg_out = self.out_grads
        dk_state, dv, dbeta, dg_state = self.state_pass_grads
        out = [dq, _add(dk_out, dk_state), dv, dbeta, _add(dg_out, dg_state)]
        return [None if g is None else g.to(t.dtype) for g, t in zip(out, self.inputs)]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else (a if b is None else a + b)


# ----------------------------------------------------------------------------------------------------
# LASP-2: one all-gather of (A_r, B_r)
# ----------------------------------------------------------------------------------------------------


class _GatherTransfer:
    """(A_r, B_r, initial) -> (S_in(r), final state or None) by one all-gather; backward by one all-gather of
    (L_r[, dF_r]). ``begin`` issues the transfer, ``end`` waits for it and folds."""

    def __init__(self, sp: DeltaSP, output_final_state: bool) -> None:
        self.sp, self.output_final_state = sp, output_final_state

    def begin(self, a: torch.Tensor, m: torch.Tensor, initial: torch.Tensor | None) -> None:
        sp = self.sp
        self.n_a, self.a_shape, self.m_shape, self.initial = a.numel(), a.shape, m.shape, initial
        self.payload = torch.cat([a.reshape(-1), m.reshape(-1)])
        self.pending = comm.all_gather_async(self.payload, group=sp.group) if sp.world_size > 1 else None

    def end(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        sp = self.sp
        gathered = self.pending.wait() if self.pending is not None else self.payload[None]
        maps = gathered[:, :self.n_a].reshape(sp.world_size, *self.a_shape)
        states = gathered[:, self.n_a:].reshape(sp.world_size, *self.m_shape)
        s = None if self.initial is None else self.initial.detach().to(sp.cdt).clone()
        for j in range(sp.rank):  # S_in(j + 1) = A_j S_in(j) + B_j
            s = _apply(maps[j], s, states[j])
        s_in = torch.zeros(self.m_shape, dtype=sp.cdt, device=gathered.device) if s is None else s
        final = None
        if self.output_final_state:  # every rank folds on through the later ranks: the same final state everywhere
            final = s_in
            for j in range(sp.rank, sp.world_size):
                final = _apply(maps[j], final, states[j])
        self.maps = maps
        self.payload = self.pending = None
        return s_in, final

    def begin_backward(self, l_r: torch.Tensor, d_final: torch.Tensor | None) -> None:
        sp = self.sp
        self.l_r = l_r
        parts = [l_r.reshape(-1)]
        if self.output_final_state:  # an unused final state on this rank: its gradient is zero (and still travels)
            parts.append((torch.zeros_like(l_r) if d_final is None else d_final.to(sp.cdt)).reshape(-1))
        self.payload = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.pending = comm.all_gather_async(self.payload, group=sp.group) if sp.world_size > 1 else None

    def end_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda_{r+1}, this rank's share of the initial state's gradient: lambda_0 on rank 0, else 0)."""
        sp = self.sp
        gathered = self.pending.wait() if self.pending is not None else self.payload[None]
        n, shape = self.l_r.numel(), self.l_r.shape
        l_all = gathered[:, :n].reshape(sp.world_size, *shape)
        # lambda_P = sum of the final-state gradients; lambda_j = L_j + A_j^T lambda_{j+1}, down to r + 1
        lam = gathered[:, n:].sum(0).reshape(shape) if self.output_final_state else torch.zeros_like(self.l_r)
        for j in range(sp.world_size - 1, sp.rank, -1):
            lam = l_all[j] + self.maps[j].mT @ lam
        d_init = self.l_r + self.maps[0].mT @ lam if sp.rank == 0 else torch.zeros_like(self.l_r)
        return lam, d_init


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


class _RelayTransfer:
    """(A_r, B_r, initial) -> (S_in(r), final state or None) by the pipelined All-Scan (relayed on a thread
    between ``begin`` and ``end``); backward by the reverse scan (the final state's gradients summed up its tree
    first)."""

    def __init__(self, sp: DeltaSP, output_final_state: bool, num_pieces: int) -> None:
        self.sp, self.output_final_state, self.num_pieces = sp, output_final_state, num_pieces
        b, h, dk, dv = sp.state_shape
        self.t_shape = (b, h, dv, dk)

    def begin(self, a: torch.Tensor, m: torch.Tensor, initial: torch.Tensor | None) -> None:
        sp = self.sp
        self.a = a
        self.relay = AffineScanRelay(self.t_shape, sp.cdt, m.device, group=sp.group, num_pieces=self.num_pieces)
        self.parent, self.children = final_state_tree(sp.rank, sp.world_size)
        self.final_recv = None
        if self.output_final_state and self.parent is not None:
            self.final_recv = comm.recv(torch.empty(self.t_shape, dtype=sp.cdt, device=m.device), self.parent,
                                        group=sp.group, tag=TAG_FINAL_STATE)
        start = None if initial is None else initial.detach().to(sp.cdt).mT.contiguous()
        self.relay.start(m.mT, a.mT, initial_state=start)  # the first rank sends every piece now

    def end(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        sp = self.sp
        s_in_t, s_out_t = self.relay.complete()
        final_t, sends = None, []
        if self.output_final_state:
            final_t = s_out_t if self.parent is None else self.final_recv.wait()
            sends = [comm.send(final_t, c, group=sp.group, tag=TAG_FINAL_STATE) for c in self.children]
        self.relay.finish()
        for pending in sends:
            pending.wait()
        self.relay = self.final_recv = None
        return s_in_t.mT.contiguous(), None if final_t is None else final_t.mT.contiguous()

    def begin_backward(self, l_r: torch.Tensor, d_final: torch.Tensor | None) -> None:
        sp = self.sp
        self.relay = AffineScanRelay(self.t_shape, sp.cdt, l_r.device, group=sp.group, num_pieces=self.num_pieces,
                                     reverse=True)
        lam_last, self.grad_send = None, None
        if self.output_final_state:  # lambda_P = the sum of every rank's final-state gradient, up the tree
            total = torch.zeros_like(l_r) if d_final is None else d_final.to(sp.cdt)
            recvs = [comm.recv(torch.empty_like(total), c, group=sp.group, tag=TAG_FINAL_GRAD) for c in self.children]
            for pending in recvs:
                total = total + pending.wait()
            if self.parent is not None:
                self.grad_send = comm.send(total.contiguous(), self.parent, group=sp.group, tag=TAG_FINAL_GRAD)
            lam_last = total.mT.contiguous()
        # reverse scan: receive lambda_{r+1}, send lambda_r = L_r + A_r^T lambda_{r+1} (transposed: @ A_r)
        self.relay.start(l_r.mT, self.a, initial_state=lam_last)

    def end_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda_{r+1}, this rank's share of the initial state's gradient: lambda_0 on rank 0, else 0)."""
        lam_next_t, lam_here_t = self.relay.complete()
        self.relay.finish()
        if self.grad_send is not None:
            self.grad_send.wait()
        self.relay = self.grad_send = None
        lam_next = lam_next_t.mT.contiguous()
        return lam_next, lam_here_t.mT.contiguous() if self.sp.rank == 0 else torch.zeros_like(lam_next)


# ----------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------


class _DeltaRuleSP(torch.autograd.Function):
    """The local passes interleaved with the transfer: state pass, transfer issued, output pass while it
    travels, then the read-out of S_in. Backward: L_r, reverse transfer issued, the output pass's backward while
    it travels, then the state pass's backward."""

    @staticmethod
    @keeps_own_graph
    def forward(ctx, q, k, v, beta, log_decay, initial_state, sp: DeltaSP, output_final_state: bool, transfer):
        local = _LocalPass(q, k, v, beta, log_decay, sp, ctx.needs_input_grad)
        tracing.record("kernel", name="delta_rule.transition")
        a, m = local.transition()
        transfer.begin(a, m, initial_state)
        tracing.record("kernel", name="delta_rule.intra")
        local.outputs()
        s_in, final = transfer.end()
        tracing.record("kernel", name="delta_rule.inter")
        o = local.finish(s_in)
        ctx.local, ctx.transfer = local, transfer
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        local: _LocalPass = ctx.local
        transfer = ctx.transfer
        transfer.begin_backward(local.incoming_state_grad(do), d_final)
        tracing.record("kernel", name="delta_rule.intra_backward")
        local.output_grads(do)
        lam, d_init = transfer.end_backward()
        tracing.record("kernel", name="delta_rule.state_backward")
        local.state_grads(lam)
        grads = local.input_grads()
        if ctx.initial_dtype is None or not ctx.needs_input_grad[5]:
            d_init = None
        else:
            d_init = d_init.to(ctx.initial_dtype)
        ctx.local = ctx.transfer = None  # free the graphs
        return (*grads, d_init, None, None, None)


def _run(transfer, q, k, v, beta, log_decay, initial_state, sp: DeltaSP, output_final_state):
    o, final = _DeltaRuleSP.apply(q, k, v, beta, log_decay, initial_state, sp, bool(output_final_state), transfer)
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
    return _run(_GatherTransfer(sp, bool(output_final_state)), q, k, v, beta, log_decay, initial_state, sp,
                output_final_state)


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
    ``scan.choose_pieces(P, state bytes, Dv)`` on the link's latency x bandwidth, ``scan.link_latency_bytes``).

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
        num_pieces = choose_pieces(sp.world_size, math.prod(sp.state_shape) * e, sp.state_shape[3],
                                   latency_bytes=link_latency_bytes())  # the rule the cost model charges
    return _run(_RelayTransfer(sp, bool(output_final_state), num_pieces), q, k, v, beta, log_decay, initial_state,
                sp, output_final_state)
