"""LASP-2 (Sun et al. 2025, arXiv 2502.07563): linear-attention SP with one all-gather of memory states.

Recurrence S_t = exp(g_t) * S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t over the whole sequence, cut in P
contiguous slices (rank r holds slice r). Per rank r, with b_t the cumulative log decay inside the slice:

* M_r = sum_t exp(D_r - b_t) k_t v_t^T     its slice's state contribution (zero incoming state), (B, H, Dk, Dv)
* D_r = b_{last}                           the slice's total log decay, (B, H)
* S_in(r) = exp(D_{r-1}) S_in(r-1) + M_{r-1}, S_in(0) = initial_state (or 0)   the state entering the slice
* o = intra(q, k, v) + scale * exp(b_t) q_t^T S_in(r)

Forward: M_r and D_r (O(S Dk Dv), cheap) -> ONE all-gather of (M_r, D_r) issued -> the intra-chunk output
(the O(S C D) part) computed while it flies -> wait -> fold the earlier ranks' (M_j, D_j) into S_in(r) ->
add the inter term. Every rank also folds the remaining ranks to get the whole sequence's final state.

Backward (the adjoint, right to left): a_r = dL/dS_in(r) obeys a_r = L_r + exp(D_r) a_{r+1}, a_P = dF (the
final state's gradient), with L_r = scale * sum_t exp(b_t) q_t do_t^T what this rank's own outputs ask of
S_in(r). So: L_r first -> ONE all-gather of L_r (and dF_r) issued -> the gradients through the outputs
(intra part and inter part with S_in(r) known) computed while it flies -> wait -> fold the later ranks into
a_{r+1} = dM_r -> gradients through M_r and D_r (dD_r = <a_{r+1}, exp(D_r) S_in(r)>). Rank 0 also gets the
initial state's gradient a_0.

Bytes sent per rank (all-gather convention (P - 1) * input; N = B*H*Dk*Dv; e = 8 for float64 input, else 4,
the states travel in the float32/float64 compute dtype; 0 when P = 1):

    forward  = (P - 1) * (N + [per-token decay] * B*H) * e
    backward = (P - 1) * (1 + [output_final_state]) * N * e

Independent of the sequence length. The decay travels only for per-token (B, S, H) decay: for the per-head
(H,) kind every rank knows D_j = S_local * g (equal slices), for no decay D_j = 0.

Gradient conventions: inputs every rank holds whole (a per-head (H,) ``log_decay``, ``initial_state``) get
this rank's partial gradient and their sum over the group is the full gradient (what a gradient all-reduce
does for parameters); ``initial_state``'s partial is the whole gradient on rank 0 and zeros elsewhere.
The final state returned with ``output_final_state=True`` is the same tensor value on every rank, and the
gradients it receives on the ranks are SUMMED: the group's loss is the sum of the ranks' losses, so a loss
term on the final state should be added on one rank only (or scaled by 1/P on each) to count it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar import tracing
from seqpar.collectives import comm
from seqpar.kernels.linear import (
    chunk_state,
    linear_attention_chunk,
    linear_attention_inter,
    resolve_linear_backend,
    total_log_decay,
    validate_linear_inputs,
)

__all__ = ["LinearSP", "lasp2_linear_attention", "prepare_linear_sp"]


# ----------------------------------------------------------------------------------------------------
# What LASP-2 and ZeCO share: argument checks and the pieces of the local computation
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSP:
    """One call's checked arguments.

    Attributes:
        decay_kind: ``"none"``, ``"head"`` ((H,), whole on every rank) or ``"token"`` ((B, S_local, H)).
        cdt: the compute dtype, float64 for float64 input, else float32 (states, decays and what travels).
    """

    group: dist.ProcessGroup
    rank: int
    world_size: int
    scale: float
    decay_kind: str
    cdt: torch.dtype
    shape: tuple[int, int, int, int, int]  # B, S_local, H, Dk, Dv

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        b, _, h, dk, dv = self.shape
        return (b, h, dk, dv)


def prepare_linear_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    *,
    group: dist.ProcessGroup | None,
    scale: float | None,
    layout: str,
    backend: str,
    op: str,
    extra: str = "",
) -> LinearSP:
    """Check one linear-attention SP call, locally and identically on every rank, before any communication.

    Raises:
        ValueError: naming the argument: a layout other than ``"contiguous"``, non-floating or mixed-device
            tensors, shapes that do not fit (B, S_local, H, Dk) / (B, S_local, H, Dv), an empty local sequence,
            ``log_decay`` of another shape, positive or non-finite, ``initial_state`` not (B, H, Dk, Dv), a
            non-finite ``scale``, a kernel backend that cannot run here, or a group this rank is not in; and, on
            every rank, when the ranks of the group disagree on shapes, dtype, scale, the decay kind, the options
            in ``extra`` ("name=value" words) or the contents of a per-head ``log_decay`` / ``initial_state``
            (``comm.check_agreement``, on by default).
    """
    if layout != "contiguous":
        raise ValueError(
            f"layout: linear attention SP needs the 'contiguous' layout (the state flows from rank r to r + 1), "
            f"got {layout!r}; shard with seqpar.shard_sequence(x, layout='contiguous')"
        )
    for name, t in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay), ("initial_state", initial_state)):
        if t is None and name in ("log_decay", "initial_state"):
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got {type(t).__name__}"
                             f"{'' if not isinstance(t, torch.Tensor) else ' of ' + str(t.dtype)}")
        if t.device != q.device:
            raise ValueError(f"{name}: must be on q's device ({q.device}), got {t.device}")
    validate_linear_inputs(q, k, v, log_decay, initial_state)
    if log_decay is not None and not bool(torch.isfinite(log_decay.detach()).all()):
        raise ValueError("log_decay: must be finite (a decay of exactly 0 makes the chunked form undefined)")
    b, s, h, dk = q.shape
    if s == 0:
        raise ValueError("q: the local sequence is empty")
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    resolve_linear_backend(backend, q.device, q.dtype)
    group, rank, size = comm.group_info(group)
    kind = "none" if log_decay is None else ("head" if log_decay.dim() == 1 else "token")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    # every rank of the group must agree on these (a collective, on by default: comm.agreement_checks);
    # whole-held inputs by their contents, per-token ones (different on every rank) by shape and dtype only
    fields = {"op": op, "q shape": tuple(q.shape), "k shape": tuple(k.shape), "v shape": tuple(v.shape),
              "dtype": q.dtype, "scale": scale, "decay kind": kind}
    fields.update(item.split("=", 1) for item in extra.split())
    contents = {"initial_state": initial_state}
    if kind == "token":
        fields["log_decay"] = f"{tuple(log_decay.shape)} {log_decay.dtype}"
    else:
        contents["log_decay"] = log_decay
    comm.check_agreement(op, fields, group=group, contents=contents)
    return LinearSP(group, rank, size, scale, kind, cdt, (b, s, h, dk, v.shape[-1]))


def decay_factor(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(D) shaped to scale (B, H, Dk, Dv) states."""
    return torch.exp(log_decay)[..., None, None]


def add_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b)]


def _grads(outputs, inputs, grad_outputs) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` over the inputs that are not None (None for the others, and for unused ones)."""
    wanted = [x for x in inputs if x is not None]
    if not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
    return [None if x is None else next(got) for x in inputs]


# The local part of both ops' backward, in three steps so that the communication can run between them. Each
# recomputes its piece of the forward graph from the saved inputs (nothing but S_in(r) is kept from forward).


def incoming_state_grad(q, log_decay, s_in, do, sp: LinearSP) -> torch.Tensor:
    """L_r = scale * sum_t exp(b_t) q_t do_t^T: the VJP of the inter term w.r.t. S_in (it is linear in S_in)."""
    with torch.enable_grad():
        s_leaf = s_in.detach().requires_grad_(True)
        g = None if log_decay is None else log_decay.detach()
        o_inter = linear_attention_inter(q.detach(), s_leaf, log_decay=g, scale=sp.scale)
        (l_r,) = torch.autograd.grad(o_inter, s_leaf, do.to(o_inter.dtype))
    return l_r


def grads_through_outputs(q, k, v, log_decay, s_in, do, sp: LinearSP, backend: str, needs) -> list:
    """Gradients of <o, do> w.r.t. (q, k, v, log_decay) with S_in(r) held fixed (None where not ``needs``)."""
    with torch.enable_grad():
        ql, kl, vl, gl = (None if t is None else t.detach().requires_grad_(True) for t in (q, k, v, log_decay))
        o_intra, _ = linear_attention_chunk(ql, kl, vl, log_decay=gl, scale=sp.scale, backend=backend)
        o_inter = linear_attention_inter(ql, s_in.detach(), log_decay=gl, scale=sp.scale)
        inputs = [x if need else None for x, need in zip((ql, kl, vl, gl), needs)]
        return _grads([o_intra, o_inter], inputs, [do.to(o_intra.dtype), do.to(o_inter.dtype)])


def grads_through_state(k, v, log_decay, s_in, d_m, sp: LinearSP, needs) -> list:
    """Gradients w.r.t. (q, k, v, log_decay) of what leaves the slice, S_in(r+1) = exp(D_r) S_in(r) + M_r, given
    its gradient ``d_m`` = a_{r+1}: through M_r, and through D_r with dD_r = <a_{r+1}, exp(D_r) S_in(r)>.
    M_r is recomputed by ``chunk_state`` (one einsum), much cheaper to differentiate than the kernel's state chain.
    """
    if not any(needs[1:]):
        return [None] * 4
    b, s, h, _, _ = sp.shape
    with torch.enable_grad():
        kl, vl, gl = (None if t is None else t.detach().requires_grad_(True) for t in (k, v, log_decay))
        outputs, grad_outputs = [chunk_state(kl, vl, gl)], [d_m]
        if gl is not None and needs[3]:
            d_total = total_log_decay(gl, b, s, h, sp.cdt, k.device)
            outputs.append(d_total)
            grad_outputs.append((d_m * decay_factor(d_total.detach()) * s_in).sum((-2, -1)))
        inputs = [None] + [x if need else None for x, need in zip((kl, vl, gl), needs[1:])]
        return _grads(outputs, inputs, grad_outputs)


# ----------------------------------------------------------------------------------------------------
# LASP-2
# ----------------------------------------------------------------------------------------------------


def _gathered_decays(sp: LinearSP, own: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    """(P, B, H) total log decays of every rank's slice."""
    if sp.decay_kind == "token":
        b, _, h, _, _ = sp.shape
        return gathered[:, -b * h:].reshape(sp.world_size, b, h).clone()  # saved: do not keep the P states alive
    return own[None].expand(sp.world_size, *own.shape)  # "head": the same on every rank; "none": 0


class _Lasp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, sp: LinearSP, output_final_state: bool, backend: str):
        b, s, h, dk, dv = sp.shape
        n = b * h * dk * dv
        tracing.record("kernel", name="lasp2.local_state")
        m = chunk_state(k, v, log_decay)
        d = total_log_decay(log_decay, b, s, h, sp.cdt, q.device)
        payload = m.reshape(-1) if sp.decay_kind != "token" else torch.cat([m.reshape(-1), d.reshape(-1)])
        pending = None
        if sp.world_size > 1:  # one all-gather of (M_r, D_r), issued before the intra-chunk compute
            pending = comm.all_gather_async(payload, group=sp.group)
        tracing.record("kernel", name="lasp2.intra")
        o_intra, _ = linear_attention_chunk(q, k, v, log_decay=log_decay, scale=sp.scale, backend=backend)
        gathered = pending.wait() if pending is not None else payload[None]
        states = gathered[:, :n].reshape(sp.world_size, b, h, dk, dv)
        decays = _gathered_decays(sp, d, gathered)
        s_in = (
            torch.zeros(b, h, dk, dv, dtype=sp.cdt, device=q.device)
            if initial_state is None else initial_state.to(sp.cdt)
        )
        for j in range(sp.rank):  # fold the earlier ranks: S_in(j+1) = exp(D_j) S_in(j) + M_j
            s_in = decay_factor(decays[j]) * s_in + states[j]
        final = None
        if output_final_state:  # keep folding through the later ranks: every rank gets the same final state
            final = s_in
            for j in range(sp.rank, sp.world_size):
                final = decay_factor(decays[j]) * final + states[j]
        tracing.record("kernel", name="lasp2.inter")
        o = o_intra.to(sp.cdt) + linear_attention_inter(q, s_in, log_decay=log_decay, scale=sp.scale)
        ctx.sp, ctx.output_final_state, ctx.backend = sp, output_final_state, backend
        ctx.has_initial = initial_state is not None
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.save_for_backward(q, k, v, log_decay, s_in, decays)
        return o.to(q.dtype), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, log_decay, s_in, decays = ctx.saved_tensors
        sp: LinearSP = ctx.sp
        b, _, h, dk, dv = sp.shape
        n = b * h * dk * dv
        needs = ctx.needs_input_grad
        l_r = incoming_state_grad(q, log_decay, s_in, do, sp)
        parts = [l_r.reshape(-1)]
        if ctx.output_final_state:  # unused final state on this rank: its gradient is zero (and still travels)
            parts.append((torch.zeros_like(l_r) if dfinal is None else dfinal.to(sp.cdt)).reshape(-1))
        payload = torch.cat(parts)
        pending = None
        if sp.world_size > 1:  # one all-gather of (L_r[, dF_r]), issued before the local gradients
            pending = comm.all_gather_async(payload, group=sp.group)
        tracing.record("kernel", name="lasp2.intra_backward")
        grads = grads_through_outputs(q, k, v, log_decay, s_in, do, sp, ctx.backend, needs[:4])
        gathered = pending.wait() if pending is not None else payload[None]
        l_all = gathered[:, :n].reshape(sp.world_size, b, h, dk, dv)
        # a_P = the sum of the ranks' final-state gradients; a_j = L_j + exp(D_j) a_{j+1}, folded down to r + 1
        a = gathered[:, n:].sum(0).reshape(b, h, dk, dv) if ctx.output_final_state else torch.zeros_like(l_r)
        for j in range(sp.world_size - 1, sp.rank, -1):
            a = l_all[j] + decay_factor(decays[j]) * a
        tracing.record("kernel", name="lasp2.state_backward")
        grads = add_grads(grads, grads_through_state(k, v, log_decay, s_in, a, sp, needs[:4]))
        d_init = None
        if ctx.has_initial and needs[4]:  # whole-held: all of a_0 on rank 0, zeros elsewhere
            d_init = (l_r + decay_factor(decays[0]) * a) if sp.rank == 0 else torch.zeros_like(l_r)
            d_init = d_init.to(ctx.initial_dtype)
        return (*grads, d_init, None, None, None)


def lasp2_linear_attention(
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel linear attention by LASP-2: one all-gather of memory states per layer and direction.

    Args:
        q, k: (B, S_local, H, Dk) local shards (contiguous layout); v: (B, S_local, H, Dv).
        log_decay: None, (H,) per-head (the same whole tensor on every rank) or (B, S_local, H) per token
            (local shard); all <= 0.
        scale: default 1 / sqrt(Dk).
        initial_state: (B, H, Dk, Dv), the state before rank 0's first token (the same on every rank).
        output_final_state: also return the whole sequence's final state (B, H, Dk, Dv), on every rank.
        layout: must be ``"contiguous"``.
        backend: kernel backend for the intra-chunk part (``seqpar.kernels.linear.LINEAR_BACKENDS``).

    Returns:
        o (B, S_local, H, Dv) in q's dtype, or ``(o, final_state)`` with ``final_state`` in float32 (float64
        for float64 input). Gradient conventions: see the module docstring (whole-held inputs get partial
        gradients; the final state's gradients are summed over ranks).

    Bytes sent per rank: forward ``(P-1) * (N + [per-token decay] B*H) * e``, backward
    ``(P-1) * (1 + [output_final_state]) * N * e`` with N = B*H*Dk*Dv, e = 8 (float64) or 4.

    Raises:
        ValueError: see ``prepare_linear_sp``; on every rank given the bad input, before any communication.
    """
    sp = prepare_linear_sp(q, k, v, log_decay, initial_state, group=group, scale=scale, layout=layout,
                           backend=backend, op="lasp2_linear_attention",
                           extra=f"output_final_state={bool(output_final_state)}")
    o, final = _Lasp2.apply(q, k, v, log_decay, initial_state, sp, bool(output_final_state), backend)
    return (o, final) if output_final_state else o
