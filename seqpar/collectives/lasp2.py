"""LASP-2 (Sun et al. 2025, arXiv 2502.07563): linear-attention SP with one all-gather of memory states.

Recurrence S_t = exp(g_t) * S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t over the whole sequence, cut in P
contiguous slices (rank r holds slice r). Per rank r, with b_t the cumulative log decay inside the slice:

* M_r = sum_t exp(D_r - b_t) k_t v_t^T     its slice's state contribution (zero incoming state), (B, H, Dk, Dv)
* D_r = b_{last}                           the slice's total log decay, (B, H) ((B, H, Dk) for GLA)
* S_in(r) = exp(D_{r-1}) S_in(r-1) + M_{r-1}, S_in(0) = initial_state (or 0)   the state entering the slice
* o = intra(q, k, v) + scale * exp(b_t) q_t^T S_in(r)

Forward: the state pass of the chunked form (O(S Dk Dv): every chunk's entering state with zero incoming state,
M_r its last one) and D_r -> ONE all-gather of (M_r, D_r) issued -> the output pass (the O(S C D) part, from the
entering states: the state is computed once) while it flies -> wait -> fold the earlier ranks' (M_j, D_j) into
S_in(r) -> add the inter term. Every rank also folds the remaining ranks to get the whole sequence's final state.
Rank 0 has no inter term: with the torch backend it starts its state pass from the initial state (its
outgoing state exp(D_0) I + M_0 is what it sends as "M_0", and every rank folds from zero), so its incoming
state is zero; other backends fold from I and rank 0 adds the inter term only when I is given.

Decay kinds: none, per head (H,), per token (B, S, H), and GLA's per token and key dimension (B, S, H, Dk), for
which D_r is (B, H, Dk) and exp(D_r) scales each key row of a state. Ranks may hold different lengths: D_r is
gathered with M_r whatever the kind (per head, D_r = S_r * g differs between ranks holding different lengths).

Packed batches (``cu_seqlens``): N sequences, each cut in P equal parts (``seqpar.shard_sequence``), so every
sequence has a piece on every rank; the state is per sequence, (N, H, Dk, Dv), and resets at the boundaries.
The same one all-gather carries all N states: one collective per call, not one per sequence.

No recomputation in the backward: the forward keeps its autograd graphs (as the plain kernel's autograd does)
with the entering states cut out as leaves, so the backward runs each forward op's backward exactly once. No
host syncs in forward or backward; the one value check (log_decay <= 0 and finite) and reading ``cu_seqlens``
are in the argument check (``prepare_linear_sp``), once per call.

Backward (the adjoint, right to left): a_r = dL/dS_in(r) obeys a_r = L_r + exp(D_r) a_{r+1}, a_P = dF (the
final state's gradient), with L_r = scale * sum_t exp(b_t) q_t do_t^T what this rank's own outputs ask of
S_in(r). So: L_r first -> ONE all-gather of L_r (and dF_r) issued -> the gradients through the outputs
(intra part and inter part with S_in(r) known) computed while it flies -> wait -> fold the later ranks into
a_{r+1} = dM_r -> gradients through M_r and D_r (dD_r = <a_{r+1}, exp(D_r) S_in(r)>). Rank 0 also gets the
initial state's gradient a_0 (with the torch backend out of its state pass's backward).

Bytes sent per rank (all-gather convention (P - 1) * input; N = B*H*Dk*Dv; e = 8 for float64 input, else 4,
the states travel in the float32/float64 compute dtype; 0 when P = 1):

    forward  = (P - 1) * (N + [decay] * B*H * [Dk if GLA]) * e
    backward = (P - 1) * (1 + [output_final_state]) * N * e

Independent of the sequence length (with ``cu_seqlens`` read N_seq for B). The decay travels for every decay
kind (no decay: D_j = 0 and nothing travels); it is tiny next to the state.

Gradient conventions: inputs every rank holds whole (a per-head (H,) ``log_decay``, ``initial_state``) get
this rank's partial gradient and their sum over the group is the full gradient (what a gradient all-reduce
does for parameters); ``initial_state``'s partial is the whole gradient on rank 0 and zeros elsewhere.
The final state returned with ``output_final_state=True`` is the same tensor value on every rank, and the
gradients it receives on the ranks are SUMMED: the group's loss is the sum of the ranks' losses, so a loss
term on the final state should be added on one rank only (or scaled by 1/P on each) to count it once.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar import tracing
from seqpar.collectives import comm
from seqpar.kernels.linear import (
    backend_for_decay,
    chunk_local_output,
    chunk_local_states,
    chunk_state,
    decayed_queries,
    get_linear_backend,
    state_decay,
    total_log_decay,
    validate_linear_inputs,
)

__all__ = ["LinearSP", "lasp2_linear_attention", "prepare_linear_sp"]


# ----------------------------------------------------------------------------------------------------
# What LASP-2 and ZeCO share: argument checks and the local computation
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSP:
    """One call's checked arguments.

    Attributes:
        decay_kind: ``"none"``, ``"head"`` ((H,), whole on every rank), ``"token"`` ((B, S_local, H)) or ``"key"``
            (GLA, (B, S_local, H, Dk)).
        cdt: the compute dtype, float64 for float64 input, else float32 (states, decays and what travels).
        segments: the local token range of each sequence, ((0, S_local),) without ``cu_seqlens``.
        packed: True with ``cu_seqlens`` (B = 1; states and decays are per sequence).
        backend: the resolved kernel backend name.
    """

    group: dist.ProcessGroup
    rank: int
    world_size: int
    scale: float
    decay_kind: str
    cdt: torch.dtype
    shape: tuple[int, int, int, int, int]  # B, S_local, H, Dk, Dv
    segments: tuple[tuple[int, int], ...]
    packed: bool
    chunk_size: int
    backend: str

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        """(B, H, Dk, Dv), or (N_seq, H, Dk, Dv) for a packed batch."""
        b, _, h, dk, dv = self.shape
        return (len(self.segments) if self.packed else b, h, dk, dv)

    @property
    def per_key(self) -> bool:
        return self.decay_kind == "key"


def _check_cu_seqlens(cu_seqlens, q: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The local segments of a packed batch (one host sync: reading the boundaries)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        got = f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} {tuple(getattr(cu_seqlens, 'shape', ()))}"
        raise ValueError(f"cu_seqlens: expected a 1-D int32 tensor of local boundaries [0, ..., S_local], got {got}")
    if q.shape[0] != 1:
        raise ValueError(f"q: a packed batch (cu_seqlens) has batch size 1, got {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[1] or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"cu_seqlens: expected strictly increasing local boundaries from 0 to S_local = {q.shape[1]} (every "
            f"sequence has tokens on every rank: shard each one with seqpar.shard_sequence), got {bounds}"
        )
    return tuple(zip(bounds, bounds[1:]))


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
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> LinearSP:
    """Check one linear-attention SP call, locally and identically on every rank, before any communication.

    Host syncs: one when ``log_decay`` is given (<= 0 and finite, one combined check), one when ``cu_seqlens`` is
    (reading the boundaries); none in the op's forward and backward.

    Raises:
        ValueError: naming the argument: a layout other than ``"contiguous"``, non-floating or mixed-device
            tensors, shapes that do not fit (B, S_local, H, Dk) / (B, S_local, H, Dv), an empty local sequence,
            ``log_decay`` of another shape, positive or non-finite, ``initial_state`` not (B, H, Dk, Dv)
            ((N_seq, H, Dk, Dv) packed), ``cu_seqlens`` not int32 boundaries 0 < ... < S_local with B = 1,
            ``chunk_size`` < 1, a non-finite ``scale``, a kernel backend that cannot run here, or a group this rank
            is not in; and, on every rank, when the ranks of the group disagree on shapes, dtype, scale, the decay
            kind, the number of sequences, the options in ``extra`` ("name=value" words) or the contents of a
            per-head ``log_decay`` / ``initial_state`` (``comm.check_agreement``, on by default).
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
    segments, batch_state = None, initial_state
    if cu_seqlens is not None and q.dim() == 4:
        segments = _check_cu_seqlens(cu_seqlens, q)
        if initial_state is not None:  # per sequence: check its shape here, the batch check below sees B = 1
            want = (len(segments), q.shape[2], q.shape[3], v.shape[-1] if v.dim() == 4 else -1)
            if tuple(initial_state.shape) != want:
                raise ValueError(f"initial_state: expected (N_seq, H, Dk, Dv) = {want} for a packed batch, got "
                                 f"{tuple(initial_state.shape)}")
            batch_state = None
    validate_linear_inputs(q, k, v, log_decay, batch_state, check_values=False)
    if log_decay is not None:  # one host sync for both value checks
        g = log_decay.detach()
        if bool(((g > 0) | ~torch.isfinite(g)).any()):
            raise ValueError("log_decay: must be finite and <= 0 (the log of a decay factor in (0, 1]; a decay of "
                             "exactly 0 makes the chunked form undefined); e.g. use -softplus(x)")
    b, s, h, dk = q.shape
    if s == 0:
        raise ValueError("q: the local sequence is empty")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an int >= 1, got {chunk_size!r}")
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    backend = backend_for_decay(backend, q.device, q.dtype, log_decay).name
    group, rank, size = comm.group_info(group)
    kind = "none" if log_decay is None else {1: "head", 3: "token", 4: "key"}[log_decay.dim()]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    # every rank of the group must agree on these (a collective, on by default: comm.agreement_checks);
    # whole-held inputs by their contents, per-token ones (different on every rank) by shape and dtype only.
    # Local lengths may differ between ranks: the sequence dim of the shapes is not compared.
    fields = {"op": op, "q shape": _without_length(q), "k shape": _without_length(k), "v shape": _without_length(v),
              "dtype": q.dtype, "scale": scale, "decay kind": kind, "chunk_size": chunk_size,
              "sequences": None if segments is None else len(segments)}
    fields.update(item.split("=", 1) for item in extra.split())
    contents = {"initial_state": initial_state}
    if kind in ("token", "key"):
        fields["log_decay"] = f"{_without_length(log_decay)} {log_decay.dtype}"
    else:
        contents["log_decay"] = log_decay
    comm.check_agreement(op, fields, group=group, contents=contents)
    return LinearSP(group, rank, size, scale, kind, cdt, (b, s, h, dk, v.shape[-1]),
                    segments or ((0, s),), segments is not None, chunk_size, backend)


def _without_length(t: torch.Tensor) -> tuple:
    """A (B, S_local, ...) shape with the local length left out (ranks may hold different lengths)."""
    return (t.shape[0], "S", *t.shape[2:])


def add_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b)]


def _grads(outputs, grad_outputs, inputs) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` of the outputs that carry a graph, w.r.t. the inputs that require grad (None for
    the others and for unreached ones)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    if not pairs or not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(got) if x is not None and x.requires_grad else None for x in inputs]


def _leaf(t: torch.Tensor | None, need: bool) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(need)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def keeps_own_graph(forward):
    """Decorates an autograd.Function's ``forward`` that builds autograd graphs of its own and keeps them for its
    backward (``LocalPass``): those graphs hold their saved tensors themselves, whatever saved-tensor hooks the
    caller set. Non-reentrant activation checkpointing's hooks would drop them and, when the op's backward
    reads them inside its own ``torch.autograd.grad``, recompute the whole checkpointed block a second time
    in that nested graph task (its collectives included), where the recomputation does not match the forward
    (``CheckpointError``). The block's other tensors are still recomputed as usual."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_same, _same))
            except RuntimeError:  # hooks are disabled here (torch.func, an AOTAutograd region that inlined the
                pass  # caller's hooks): none apply to step out of
            return forward(*args, **kwargs)

    return run


class LocalPass:
    """This rank's computation in one call, in the steps the SP ops interleave with communication, kept as
    autograd graphs from the forward so that the backward runs every op's backward once (no recomputation).

    Forward: ``states()`` (M_r, D_r), then ``output(i)`` for each output piece i (the intra-chunk work, split
    so ZeCO can relay scan pieces between them) and ``inter_queries()`` (the inter term's decayed queries),
    all while the transfer runs, then ``finish(s_in)`` (the inter term's einsum; o). Backward:
    ``incoming_state_grad(do)`` (L_r), then while the transfer runs ``output_grads(i, do)`` per piece and
    ``inter_grads(do)`` (through the inter term: S_in is known), then ``state_grads(a, do)`` (through M_r and
    D_r) and ``input_grads()``.

    The graphs: whole-sequence leaves Q, K, V, G feed the state pass, D and the inter term; each output piece
    (a chunk-aligned token range of one sequence) has its own leaves q_i, k_i, v_i, g_i and its entering states
    as a leaf, so its backward makes no full-length gradient and leaves the state pass to ``state_grads``.
    A per-head (H,) decay is one leaf shared by all. With the torch backend the state is computed once
    (entering states from the state pass); another backend (Triton) computes M_r by ``chunk_state`` and its
    output piece by its own chunk kernel (which builds its states again).
    """

    def __init__(self, q, k, v, log_decay, initial_state, sp: LinearSP, needs, *,
                 pieces_per_sequence: int = 1) -> None:
        self.sp = sp
        self.needs = needs
        # With the torch backend rank 0 starts its state pass from the initial state, so its "M_0" is the state
        # leaving it (exp(D_0) I + M_0) and every rank folds from zero: the same S_in(r), no inter term on rank 0,
        # and I's gradient comes out of the state pass's backward. ``folds_initial``: the ops fold from zero.
        self.folds_initial = sp.backend == "torch"
        self.I = _leaf(initial_state, needs[4]) if self.folds_initial and sp.rank == 0 else None
        self.grad = any(needs[:4]) or self.I is not None and needs[4]  # graphs only where a gradient is needed
        self.inputs = (q, k, v, log_decay)
        self.Q, self.K, self.V, self.G = (_leaf(t, n) for t, n in zip(self.inputs, needs))
        self.shared_g = log_decay is not None and log_decay.dim() == 1
        c = sp.chunk_size
        if sp.backend != "torch":  # another backend's kernel starts every call from a zero state: whole sequences
            pieces_per_sequence = 1
        self.pieces = []  # (sequence index, start, end) in local tokens; chunk-aligned within the sequence
        for j, (a, b) in enumerate(sp.segments):
            n_chunks = -(-(b - a) // c)
            per = -(-n_chunks // max(1, min(pieces_per_sequence, n_chunks)))  # chunks per piece
            for start in range(a, b, per * c):
                self.pieces.append((j, start, min(b, start + per * c)))
        self.piece_leaves: list = [None] * len(self.pieces)  # (leaves q, k, v, g; entering states leaf)
        self.piece_out: list = [None] * len(self.pieces)
        self.piece_grads: list = [None] * len(self.pieces)  # (dq, dk, dv, dg, d_entering) after output_grads
        self.qd_parts: list | None = None  # the inter term's decayed queries, from inter_queries()
        self.inter_input_grads: list | None = None  # the inter term's input gradients, from inter_grads()

    def _g(self, g, a, b):
        return None if g is None else (g if self.shared_g else g[:, a:b])

    def states(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(M, D): M (state_shape) every sequence's state contribution with zero incoming state, D its total log
        decay ((B or N_seq, H[, Dk]); None without decay), both in the compute dtype (detached)."""
        sp = self.sp
        with torch.set_grad_enabled(self.grad):
            ms, ds, self.entering = [], [], []
            for j, (a, b) in enumerate(sp.segments):
                k, v, g = self.K[:, a:b], self.V[:, a:b], self._g(self.G, a, b)
                if sp.backend == "torch":
                    init = None if self.I is None else (self.I[j:j + 1] if sp.packed else self.I)
                    entering, m = chunk_local_states(k, v, g, chunk_size=sp.chunk_size, initial_state=init)
                else:
                    entering, m = None, chunk_state(k, v, g)
                self.entering.append(entering)
                ms.append(m)
                if g is not None:
                    bsz, _, h, _, _ = sp.shape
                    ds.append(total_log_decay(g, bsz, b - a, h, sp.cdt, k.device))
            self.m = torch.cat(ms, 0) if len(ms) > 1 else ms[0]
            self.d = None if not ds else (torch.cat(ds, 0) if len(ds) > 1 else ds[0])
        return self.m.detach(), None if self.d is None else self.d.detach()

    def output(self, i: int) -> None:
        """Output piece i with zero incoming state (the intra-chunk work)."""
        sp = self.sp
        j, a, b = self.pieces[i]
        seg_start = sp.segments[j][0]
        leaves = [_leaf(t if t is None or (t.dim() == 1) else t[:, a:b], n)
                  for t, n in zip(self.inputs, self.needs)]
        if self.shared_g:
            leaves[3] = self.G
        with torch.set_grad_enabled(self.grad):
            if sp.backend == "torch":
                n0, n1 = (a - seg_start) // sp.chunk_size, -(-(b - seg_start) // sp.chunk_size)
                entering = _leaf(self.entering[j][:, :, n0:n1], self.grad)
                o = chunk_local_output(*leaves, entering, scale=sp.scale, chunk_size=sp.chunk_size)
            else:
                entering = None
                impl = get_linear_backend(sp.backend, leaves[0].device, leaves[0].dtype)
                o, _ = impl.chunk(*leaves[:3], log_decay=leaves[3], scale=sp.scale, initial_state=None,
                                  output_final_state=False, chunk_size=sp.chunk_size)
        self.piece_leaves[i] = (leaves, entering)
        self.piece_out[i] = o

    def inter_queries(self) -> None:
        """The inter term's decayed queries (scale exp(b_t) q_t per sequence), which need no incoming state:
        the ops compute them while their transfer runs, so that ``finish`` is one einsum per sequence. Call it
        only where ``finish`` gets a state (else it is work for nothing)."""
        sp = self.sp
        with torch.set_grad_enabled(self.grad):
            # the cumulative decay restarts at every sequence
            self.qd_parts = [decayed_queries(self.Q[:, a:b], self._g(self.G, a, b), scale=sp.scale)
                             for a, b in sp.segments]

    def finish(self, s_in: torch.Tensor | None) -> torch.Tensor:
        """o (B, S_local, H, Dv) in q's dtype: the pieces plus the inter term from ``s_in`` (None: zero, skipped)."""
        sp = self.sp
        self.s_in = s_in
        o = torch.cat([p.detach() for p in self.piece_out], 1) if len(self.pieces) > 1 else self.piece_out[0].detach()
        self.o_inter, self.q_decayed = None, None
        if s_in is not None:
            if self.qd_parts is None:
                self.inter_queries()
            qd, self.qd_parts = self.qd_parts, None
            with torch.set_grad_enabled(self.grad):
                states = s_in if not sp.packed else s_in[:, None]  # (B, ...) whole, or per sequence (1, ...)
                parts = [torch.einsum("bshk,bhkv->bshv", x, states[j] if sp.packed else states)
                         for j, x in enumerate(qd)]
                self.q_decayed = qd[0] if len(qd) == 1 else torch.cat(qd, 1)
                self.o_inter = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            o = o.to(sp.cdt) + self.o_inter.detach()
        return o.to(self.inputs[0].dtype)

    # ---- backward ----

    def incoming_state_grad(self, do: torch.Tensor) -> torch.Tensor:
        """L_r = scale * sum_t exp(b_t) q_t do_t^T per sequence (what this rank's outputs ask of S_in); zeros when
        the forward skipped the inter term (no one needs L then: rank 0 without an initial state)."""
        sp = self.sp
        if self.q_decayed is None:
            return torch.zeros(sp.state_shape, dtype=sp.cdt, device=do.device)
        qd, do = self.q_decayed.detach(), do.to(sp.cdt)
        if not sp.packed:
            return torch.einsum("bshk,bshv->bhkv", qd, do)
        return torch.cat([torch.einsum("bshk,bshv->bhkv", qd[:, a:b], do[:, a:b]) for a, b in sp.segments], 0)

    def output_grads(self, i: int, do: torch.Tensor) -> None:
        """Backward of output piece i: its input gradients and its entering states' gradient, kept for
        ``input_grads`` / ``state_grads``."""
        _, a, b = self.pieces[i]
        leaves, entering = self.piece_leaves[i]
        o = self.piece_out[i]
        self.piece_grads[i] = _grads([o], [do[:, a:b].to(o.dtype)], [*leaves, entering])
        self.piece_leaves[i] = self.piece_out[i] = None

    def inter_grads(self, do: torch.Tensor) -> None:
        """The input gradients through the inter term (o_inter = qd S_in, S_in a constant here), which need
        nothing from the other ranks: the ops run them while the reverse transfer travels; ``state_grads``
        adds them."""
        if self.o_inter is not None:
            self.inter_input_grads = _grads([self.o_inter], [do.to(self.o_inter.dtype)],
                                            [self.Q, self.K, self.V, self.G, self.I])
            self.o_inter = None  # its graph is spent

    def state_grads(self, a: torch.Tensor, do: torch.Tensor) -> None:
        """Backward through the state pass, D and the inter term, given a = dL/dM (the gradient of the state
        leaving each sequence's slice, a_{r+1}); dD = <a, exp(D) S_in> (S_in = 0 when it was skipped)."""
        sp = self.sp
        outputs, grad_outputs = [self.m], [a]
        d_entering = {}
        for i, (j, _, _) in enumerate(self.pieces):
            g_entering = self.piece_grads[i][4]
            if g_entering is not None:
                d_entering.setdefault(j, []).append(g_entering)
        for j, entering in enumerate(self.entering):
            if entering is not None and j in d_entering:
                outputs.append(entering)
                grad_outputs.append(torch.cat(d_entering[j], 2))
        if self.d is not None and self.s_in is not None:
            outputs.append(self.d)
            grad_outputs.append((a * state_decay(self.d.detach(), per_key=sp.per_key) * self.s_in)
                                .sum(-1 if sp.per_key else (-2, -1)))
        if self.o_inter is not None:
            outputs.append(self.o_inter)
            grad_outputs.append(do.to(self.o_inter.dtype))
        self.whole_grads = _grads(outputs, grad_outputs, [self.Q, self.K, self.V, self.G, self.I])
        if self.inter_input_grads is not None:
            self.whole_grads = add_grads(self.whole_grads, self.inter_input_grads)
            self.inter_input_grads = None

    def initial_state_grad(self) -> torch.Tensor | None:
        """The initial state's gradient through the state pass (rank 0 when ``folds_initial``), after
        ``state_grads``."""
        return self.whole_grads[4]

    def input_grads(self) -> list[torch.Tensor | None]:
        """(dq, dk, dv, dlog_decay): the pieces' gradients put together plus the whole-sequence ones."""
        out = []
        for n in range(4):
            parts = [got[n] for got in self.piece_grads]
            if n == 3 and self.shared_g:
                piece = None
                for p in parts:
                    piece = p if piece is None else (piece if p is None else piece + p)
            elif all(p is not None for p in parts):
                piece = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            else:
                piece = None
            out.append(add_grads([piece], [self.whole_grads[n]])[0])
        return [None if g is None else g.to(t.dtype) for g, t in zip(out, self.inputs)]


# ----------------------------------------------------------------------------------------------------
# LASP-2
# ----------------------------------------------------------------------------------------------------


class _Lasp2(torch.autograd.Function):
    @staticmethod
    @keeps_own_graph
    def forward(ctx, q, k, v, log_decay, initial_state, sp: LinearSP, output_final_state: bool):
        n = math.prod(sp.state_shape)
        local = LocalPass(q, k, v, log_decay, initial_state, sp, ctx.needs_input_grad)
        tracing.record("kernel", name="lasp2.local_state")
        m, d = local.states()
        payload = m.reshape(-1) if d is None else torch.cat([m.reshape(-1), d.reshape(-1)])
        pending = None
        if sp.world_size > 1:  # one all-gather of (M_r, D_r), issued before the intra-chunk compute
            pending = comm.all_gather_async(payload, group=sp.group)
        tracing.record("kernel", name="lasp2.intra")
        for i in range(len(local.pieces)):
            local.output(i)
        if sp.rank > 0 or (initial_state is not None and not local.folds_initial):  # finish() gets a state
            local.inter_queries()
        gathered = pending.wait() if pending is not None else payload[None]
        states = gathered[:, :n].reshape(sp.world_size, *sp.state_shape)
        decays = None if d is None else gathered[:, n:].reshape(sp.world_size, *d.shape).clone()
        s_in = None if initial_state is None or local.folds_initial else initial_state.to(sp.cdt)
        for j in range(sp.rank):  # fold the earlier ranks: S_in(j+1) = exp(D_j) S_in(j) + M_j
            s_in = _fold(s_in, states[j], None if decays is None else decays[j], sp)
        final = None
        if output_final_state:  # keep folding through the later ranks: every rank gets the same final state
            final = s_in
            for j in range(sp.rank, sp.world_size):
                final = _fold(final, states[j], None if decays is None else decays[j], sp)
        tracing.record("kernel", name="lasp2.inter")
        o = local.finish(s_in)
        ctx.sp, ctx.local, ctx.output_final_state = sp, local, output_final_state
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.decays = decays
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        sp: LinearSP = ctx.sp
        local: LocalPass = ctx.local
        n = math.prod(sp.state_shape)
        l_r = local.incoming_state_grad(do)
        parts = [l_r.reshape(-1)]
        if ctx.output_final_state:  # unused final state on this rank: its gradient is zero (and still travels)
            parts.append((torch.zeros_like(l_r) if dfinal is None else dfinal.to(sp.cdt)).reshape(-1))
        payload = torch.cat(parts) if len(parts) > 1 else parts[0]
        pending = None
        if sp.world_size > 1:  # one all-gather of (L_r[, dF_r]), issued before the local gradients
            pending = comm.all_gather_async(payload, group=sp.group)
        tracing.record("kernel", name="lasp2.intra_backward")
        for i in range(len(local.pieces)):
            local.output_grads(i, do)
        local.inter_grads(do)
        gathered = pending.wait() if pending is not None else payload[None]
        l_all = gathered[:, :n].reshape(sp.world_size, *sp.state_shape)
        # a_P = the sum of the ranks' final-state gradients; a_j = L_j + exp(D_j) a_{j+1}, folded down to r + 1
        a = gathered[:, n:].sum(0).reshape(sp.state_shape) if ctx.output_final_state else torch.zeros_like(l_r)
        decays = ctx.decays
        for j in range(sp.world_size - 1, sp.rank, -1):
            a = _fold(a, l_all[j], None if decays is None else decays[j], sp)
        tracing.record("kernel", name="lasp2.state_backward")
        local.state_grads(a, do)
        grads = local.input_grads()
        d_init = None
        if ctx.initial_dtype is not None and ctx.needs_input_grad[4]:  # whole-held: all of a_0 on rank 0
            if sp.rank != 0:
                d_init = torch.zeros_like(l_r)
            elif local.folds_initial:
                d_init = local.initial_state_grad()
            else:
                d_init = _fold(a, l_r, None if decays is None else decays[0], sp)
            d_init = d_init.to(ctx.initial_dtype)
        ctx.local = None  # free the graphs
        return (*grads, d_init, None, None)


def _fold(state: torch.Tensor | None, add: torch.Tensor, log_decay: torch.Tensor | None, sp: LinearSP) -> torch.Tensor:
    """exp(D) * state + add (state None: zero)."""
    if state is None:
        return add
    return add + (state if log_decay is None else state_decay(log_decay, per_key=sp.per_key) * state)


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
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    layout: str = "contiguous",
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel linear attention by LASP-2: one all-gather of memory states per layer and direction.

    Args:
        q, k: (B, S_local, H, Dk) local shards (contiguous layout; ranks may hold different lengths);
            v: (B, S_local, H, Dv).
        log_decay: None, (H,) per-head (the same whole tensor on every rank), (B, S_local, H) per token or
            (B, S_local, H, Dk) per token and key dimension (GLA) (local shards); all <= 0 and finite.
        scale: default 1 / sqrt(Dk).
        initial_state: (B, H, Dk, Dv) ((N_seq, H, Dk, Dv) packed), the state before rank 0's first token (the
            same on every rank).
        output_final_state: also return the whole sequence's final state (B, H, Dk, Dv) ((N_seq, ...) packed),
            on every rank.
        cu_seqlens: a packed batch (B = 1): int32 local boundaries [0, ..., S_local] of N_seq sequences, each cut
            in P parts (``seqpar.shard_sequence``) so that every sequence has tokens on every rank; states reset
            at the boundaries; one all-gather for all sequences.
        chunk_size: the chunked kernel's chunk length (the Triton path rounds it, ``triton_linear.chunk_size_for``).
        layout: must be ``"contiguous"``.
        backend: kernel backend for the local part (``seqpar.kernels.linear.get_linear_backend``).

    Returns:
        o (B, S_local, H, Dv) in q's dtype, or ``(o, final_state)`` with ``final_state`` in float32 (float64
        for float64 input). Gradient conventions: see the module docstring (whole-held inputs get partial
        gradients; the final state's gradients are summed over ranks).

    Bytes sent per rank: forward ``(P-1) * (N + [decay] B*H[*Dk]) * e``, backward
    ``(P-1) * (1 + [output_final_state]) * N * e`` with N = B*H*Dk*Dv (N_seq for B packed), e = 8 (float64) or 4.

    Raises:
        ValueError: see ``prepare_linear_sp``; on every rank given the bad input, before any communication.
    """
    sp = prepare_linear_sp(q, k, v, log_decay, initial_state, group=group, scale=scale, layout=layout,
                           backend=backend, op="lasp2_linear_attention", cu_seqlens=cu_seqlens,
                           chunk_size=chunk_size, extra=f"output_final_state={bool(output_final_state)}")
    o, final = _Lasp2.apply(q, k, v, log_decay, initial_state, sp, bool(output_final_state))
    return (o, final) if output_final_state else o
