"""What the softmax-attention SP ops share: argument checks, the packed view, and the block schedule of the
shard pairs (ring, TokenRing, Ulysses, all-gather-KV).

Every op works on the packed form: q (T_local, H, D), k (T_local, H_kv, D), v (T_local, H_kv, Dv) with int32
LOCAL ``cu_seqlens`` (Dv may differ from D: MLA).
A padded (B, S_local, H, D) batch is the packed batch of B sequences of S_local local tokens each, so one code
path serves both. Checks here are local and identical on every rank, and run before any communication, so a
mistake raises ValueError everywhere instead of leaving peers waiting in a collective.

Host reads: with the ``max_seqlen`` hint (the runtime computes it once per step, where it packs and validates
the batch) nothing here reads ``cu_seqlens`` on the host: the index tensors of zigzag halves and of the global
order are computed on the device from ``cu_seqlens`` and the (host-known) token counts, and every block's
kernel gets a derived hint (``block_max_seqlens``). tests/test_host_syncs_varlen.py counts the reads. With a
``window`` the distinct local sequence lengths are read once per call (one host read with the hint): which
shard pairs meet inside the window, and so which blocks and transfers are needed, depends on them. A window
that hides nothing of the longest sequence (Mistral's 4096 on shorter ones) is dropped: the ops run unwindowed.

Options every softmax op takes (``prepare_softmax_sp`` checks them): ``window=(left, right)`` in GLOBAL positions
within each sequence (the kernels' window: -1 unbounded; with causal also j <= i), ``softcap`` (scores ->
softcap * tanh(scores / softcap)), ``sinks`` (H,) per-head sink logits added once to the final softmax
denominator (``kernels.attention.apply_attention_sinks``), differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.layout import LAYOUTS, validate_cu_seqlens
from seqpar.kernels.fused_merge import attention_block_merge
from seqpar.strategies import position_ranges_meet, shard_position_ranges
from seqpar.kernels.attention import (
    accumulation_dtype,
    apply_attention_sinks,
    attention_block_varlen,
    attention_block_varlen_backward,
    attention_sinks_backward,
    call_features,
    check_sinks,
    check_softcap,
    check_window,
    get_attention_backend,
    merge_attention_outputs,
)


@dataclass
class SoftmaxSP:
    """One call's inputs, checked and packed.

    Attributes:
        q, k, v: packed (T, H, D) / (T, H_kv, D) views of the inputs.
        cu_seqlens: local int32 boundaries of the packed sequences (B sequences for padded input), on q's device.
        max_seqlen: the longest local sequence when known without reading ``cu_seqlens`` (padded input, or the
            caller's hint), else None (the kernels then read the boundaries themselves).
        padded_shape: the (B, S_local) of padded input, to restore the output's shape; None when packed.
        window, softcap, sinks: the checked options (None: not used).
        local_lengths: with a window, the distinct local sequence lengths (host ints), else None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int | None
    group: dist.ProcessGroup
    rank: int
    world_size: int
    layout: str
    causal: bool
    scale: float
    padded_shape: tuple[int, int] | None
    window: tuple[int, int] | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    local_lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self._positions: dict[int, torch.Tensor] = {}
        self._half_cu: torch.Tensor | None = None

    def positions(self, rank: int) -> torch.Tensor:
        """(T_local,) int64: the position within its sequence of every token of ``rank``'s shard (in that
        shard's local order), on q's device; what the kernels' window compares. No host read."""
        if rank not in self._positions:
            cu = self.global_cu_seqlens().long()
            tokens = self.q.shape[0]
            index = shard_positions(cu, tokens * self.world_size, self.world_size, rank, self.layout)
            self._positions[rank] = index - cu[token_sequence(self.cu_seqlens, tokens)]
        return self._positions[rank]

    def kernel_options(self, q_rank: int | None = None, kv_rank: int | None = None) -> dict:
        """The kernel options of a block of ``q_rank``'s queries against ``kv_rank``'s keys: softcap, and with a
        window the window and both shards' positions (full shards; ``block_options`` selects rows)."""
        options = {} if self.softcap is None else {"softcap": self.softcap}
        if self.window is not None:
            options.update(window=self.window, q_positions=self.positions(q_rank),
                           k_positions=self.positions(kv_rank))
        return options

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, H, D) -> the caller's layout ((B, S_local, H, D) for padded input)."""
        if self.padded_shape is None:
            return packed
        return packed.view(*self.padded_shape, *packed.shape[1:])

    def global_cu_seqlens(self) -> torch.Tensor:
        """Boundaries of the global packed batch (every rank holds 1/P of every sequence)."""
        return (self.cu_seqlens.long() * self.world_size).to(torch.int32)

    def rank_major_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, inverse)``: ``order[i]`` is the global packed index of the i-th token when all ranks' shards
        are concatenated in rank order (what an all-gather or all-to-all yields); ``inverse`` undoes it.
        Computed on q's device; no host read."""
        cu = self.global_cu_seqlens()
        total = self.q.shape[0] * self.world_size
        order = torch.cat([shard_positions(cu, total, self.world_size, r, self.layout) for r in range(self.world_size)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(total, device=order.device)
        return order, inverse

    def chunk_indices(self, which: str) -> torch.Tensor:
        """Local token indices of the first or second zigzag chunk of every sequence (``which``: "first"/"second"),
        on q's device; no host read."""
        cu = self.cu_seqlens.long()
        half_cu = cu // 2
        n_half = self.q.shape[0] // 2  # zigzag local lengths are even
        seq = token_sequence(half_cu, n_half)
        index = cu[seq] + torch.arange(n_half, device=cu.device) - half_cu[seq]
        return index if which == "first" else index + (half_cu[seq + 1] - half_cu[seq])

    def half_cu_seqlens(self) -> torch.Tensor:
        """The boundaries of one zigzag chunk of every sequence (computed once per call: every half block uses them)."""
        if self._half_cu is None:
            self._half_cu = (self.cu_seqlens // 2).to(torch.int32)
        return self._half_cu

    def block_max_seqlens(self, kind: str) -> tuple[int | None, int | None]:
        """The ``(max_seqlen_q, max_seqlen_k)`` kernel hints of a block kind (derived, not read): a zigzag half
        of every sequence is half as long. ``(None, None)`` without a hint."""
        m = self.max_seqlen
        if m is None:
            return None, None
        if kind == "k_first_half":
            return m, m // 2
        if kind == "q_second_half":
            return m // 2, m
        return m, m


def token_sequence(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The index of the sequence each of the ``total`` packed tokens belongs to (int64, on cu_seqlens' device).
    ``total`` (the last entry) comes from the caller's shapes, so nothing is read on the host."""
    lengths = torch.diff(cu_seqlens.long())
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total)


def shard_positions(cu_seqlens: torch.Tensor, total: int, world_size: int, rank: int, layout: str) -> torch.Tensor:
    """``layout.shard_indices(total, world_size, rank, layout=, cu_seqlens=)`` computed on the device: the global
    packed indices ``rank`` holds, in local order (int64), for GLOBAL ``cu_seqlens`` of ``total`` tokens whose
    lengths the layout divides (as the SP ops' inputs are). No host read."""
    cu = cu_seqlens.long()
    local_cu = cu // world_size
    seq = token_sequence(local_cu, total // world_size)
    offset = torch.arange(total // world_size, device=cu.device) - local_cu[seq]
    local_len = (local_cu[1:] - local_cu[:-1])[seq]
    if layout == "contiguous":
        return cu[seq] + rank * local_len + offset
    chunk = local_len // 2
    second = 2 * world_size - 1 - rank
    return cu[seq] + torch.where(offset < chunk, rank * chunk + offset, second * chunk + offset - chunk)


def prepare_softmax_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    causal: bool,
    softmax_scale: float | None,
    layout: str,
    cu_seqlens: torch.Tensor | None,
    op: str = "softmax attention",
    backend: str = "auto",
    agree: dict[str, object] | None = None,
    max_seqlen: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    positions: bool | None = None,
) -> SoftmaxSP:
    """Check one call's arguments and return the packed view. ``agree``: the op's own options that every rank
    must pass equal too (checked with the common ones). ``max_seqlen``: the longest sequence of ``cu_seqlens``,
    from whoever packed and validated the batch (the runtime, once per step): ``cu_seqlens`` is then not read on
    the host (only its dtype and size are checked, and ranks agree on the hint instead of the boundaries).
    ``window``/``softcap``/``sinks``: the ops' options (module docstring); ``positions``: whether the op's kernels
    get explicit positions (default: with a window), which the backend must support.

    Raises:
        ValueError: naming the argument: wrong ranks of tensors, q/k/v shape, dtype or device mismatch,
            H % H_kv != 0, an unknown layout, a local length the layout cannot produce (zigzag needs an even
            number of local tokens per sequence), ``cu_seqlens`` that are not int32 / increasing / do not end at
            the number of local tokens, a kernel backend that cannot run these tensors, or a group this rank is
            not in, a bad ``window``/``softcap``/``sinks`` or a backend without them; and, on every rank, when the
            ranks of the group disagree on q/k/v shapes, dtype, causal, layout, scale, cu_seqlens, window,
            softcap or sinks (``comm.check_agreement``, on by default).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown layout {layout!r}; use one of {LAYOUTS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: dtypes must match q ({q.dtype}); got k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: must be on q's device ({q.device}); got k {k.device}, v {v.device}")
    packed = cu_seqlens is not None
    want = 3 if packed else 4
    shape_doc = "(T_local, H, D) with cu_seqlens" if packed else "(B, S_local, H, D)"
    if q.dim() != want:
        hint = "" if packed or q.dim() != 3 else "; pass cu_seqlens= for packed (T, H, D) input"
        raise ValueError(f"q: expected {shape_doc}, got shape {tuple(q.shape)}{hint}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"v: shape {tuple(v.shape)} must match k's {tuple(k.shape)} in all but the head dim (which may differ)"
        )
    if k.dim() != want or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k: expected the same tokens and head dim as q {tuple(q.shape)} with H_kv heads, got {tuple(k.shape)}"
        )
    h, h_kv = q.shape[-2], k.shape[-2]
    if h % h_kv:
        raise ValueError(f"k: q's {h} heads must be a multiple of k/v's {h_kv} heads (GQA)")
    requested_window, softcap = check_window(window), check_softcap(softcap)
    check_sinks(sinks, h, q)
    group, rank, size = comm.group_info(group)

    if max_seqlen is not None and not packed:
        raise ValueError("max_seqlen: a hint for packed input; pass it with cu_seqlens, or leave it None")
    bounds = None
    if packed and max_seqlen is not None:
        _check_hint(cu_seqlens, max_seqlen, q.shape[0], layout)
        cu = cu_seqlens.to(device=q.device)
        qp, kp, vp = q, k, v
        padded_shape = None
    elif packed:
        bounds = validate_cu_seqlens(cu_seqlens, q.shape[0])
        cu = cu_seqlens.to(device=q.device)
        qp, kp, vp = q, k, v
        padded_shape = None
    else:
        b, s = q.shape[:2]
        if s == 0:
            raise ValueError("q: the local sequence is empty")
        bounds = [i * s for i in range(b + 1)]
        cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
        qp, kp, vp = (t.reshape(b * s, *t.shape[2:]) for t in (q, k, v))
        padded_shape = (b, s)
        max_seqlen = s
    if layout == "zigzag" and bounds is not None:
        odd = [b_ - a for a, b_ in zip(bounds, bounds[1:]) if (b_ - a) % 2]
        if odd:
            arg = "cu_seqlens" if packed else "q"
            raise ValueError(
                f"{arg}: zigzag shards hold two equal chunks per sequence, so every local length must be even; "
                f"got {odd[:4]}; shard with seqpar.shard_sequence (pad with seqpar.pad_for_layout)"
            )
    window, lengths = requested_window, None
    if window is not None:  # which shard pairs meet inside the window depends on the lengths (module docstring)
        lengths = tuple(sorted(set(torch.diff(cu.long()).tolist() if bounds is None else
                                   [b_ - a for a, b_ in zip(bounds, bounds[1:])])))
        longest = max(lengths) * size
        left, right = window
        if (left < 0 or left >= longest - 1) and (causal or right < 0 or right >= longest - 1):
            window, lengths = None, None  # it hides nothing (Mistral's 4096 on shorter sequences): the plain path
    needs = call_features(q, v, window=window, softcap=softcap,
                          positions=window is not None if positions is None else positions)
    get_attention_backend(backend, q.device, q.dtype, needs=needs)  # an unusable backend fails here, before sending
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    # every rank of the group must agree on these (a collective, on by default: comm.agreement_checks)
    comm.check_agreement(op, {
        "op": op, "q shape": tuple(q.shape), "k shape": tuple(k.shape), "v shape": tuple(v.shape),
        "dtype": q.dtype, "causal": bool(causal), "layout": layout, "softmax_scale": scale,
        # with the hint the boundaries are compared by a hash computed on their device (no host read)
        "cu_seqlens": (bounds if bounds is not None else ("hint", cu.numel(), max_seqlen)) if packed else None,
        "window": requested_window, "softcap": softcap, "sinks": None if sinks is None else sinks.dtype,
        **(agree or {}),
    }, group=group, contents={"sinks": None if sinks is None else sinks.detach()},
        device_contents={"cu_seqlens values": cu} if packed and bounds is None else None)
    return SoftmaxSP(qp, kp, vp, cu, max_seqlen, group, rank, size, layout, bool(causal), scale, padded_shape,
                     window, softcap, sinks, lengths)


def _check_hint(cu_seqlens: torch.Tensor, max_seqlen: int, tokens: int, layout: str) -> None:
    """What can be checked of hinted packed input without reading cu_seqlens (metadata and the hint itself)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens: expected a 1-D tensor [0, len_0, len_0+len_1, ...] with at least 2 entries")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens: must be int32 (got {cu_seqlens.dtype}); use cu_seqlens.to(torch.int32)")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not 0 < max_seqlen <= tokens:
        raise ValueError(
            f"max_seqlen: expected the longest local sequence, an int in [1, {tokens}], got {max_seqlen!r}"
        )
    if layout == "zigzag" and max_seqlen % 2:
        raise ValueError(f"max_seqlen: zigzag local lengths are even, got {max_seqlen}; pass the packed batch's hint")


# ----------------------------------------------------------------------------------------------------
# Blocks: which part of a query shard meets which part of a key/value shard
# ----------------------------------------------------------------------------------------------------
#
# Query shard of rank i meets key/value shard of rank j. With the zigzag layout each shard is two chunks
# (i, 2P-1-i) of every sequence; with a causal mask in global positions:
#   j == i : the local causal mask ("causal")
#   j <  i : every query sees the first chunk of k (chunk j) and none of the second ("k_first_half")
#   j >  i : only the second query chunk (2P-1-i) sees anything, and it sees all of k ("q_second_half")
# With the contiguous layout: j < i "full", j == i "causal", j > i nothing ("skip"). Without a mask: "full".

BLOCK_KINDS = ("full", "causal", "k_first_half", "q_second_half", "skip")


def block_kind(layout: str, causal: bool, q_rank: int, kv_rank: int) -> str:
    """Which of ``BLOCK_KINDS`` the query shard of ``q_rank`` and the K/V shard of ``kv_rank`` form."""
    if not causal:
        return "full"
    if q_rank == kv_rank:
        return "causal"
    if layout == "contiguous":
        return "full" if kv_rank < q_rank else "skip"
    return "k_first_half" if kv_rank < q_rank else "q_second_half"


Rows = torch.Tensor | slice | None  # which rows of a shard take part: an index tensor, a slice (a view), None (all)


def blocks_meet(sp: SoftmaxSP, q_rank: int, kv_rank: int) -> bool:
    """Whether any query of ``q_rank``'s shard sees any key of ``kv_rank``'s shard (always, without a window).
    Host-only: from the layout and ``sp.local_lengths``; identical on every rank."""
    if sp.window is None:
        return True
    p = sp.world_size
    return any(
        position_ranges_meet(qr, kr, sp.causal, sp.window)
        for length in sp.local_lengths
        for qr in shard_position_ranges(length, p, q_rank % p, sp.layout)
        for kr in shard_position_ranges(length, p, kv_rank % p, sp.layout)
    )


def sp_block_kind(sp: SoftmaxSP, q_rank: int, kv_rank: int) -> str:
    """``block_kind`` of the two shards, "skip" also when the window hides the block completely."""
    p = sp.world_size
    kind = block_kind(sp.layout, sp.causal, q_rank % p, kv_rank % p)
    return kind if kind == "skip" or blocks_meet(sp, q_rank, kv_rank) else "skip"


def window_offsets(sp: SoftmaxSP) -> list[int]:
    """With a window, the offsets d = 1 .. P-1 at which some rank's queries meet the K/V of the rank d before it
    (``sp_block_kind`` is not "skip" for some pair (r, r - d)): the transfers a windowed schedule makes, in
    order (ring: K/V to rank + d; TokenRing: queries to rank - d). Host-only, identical on every rank."""
    p = sp.world_size
    return [d for d in range(1, p) if any(sp_block_kind(sp, r, r - d) != "skip" for r in range(p))]


def block_operands(
    sp: SoftmaxSP, kind: str, views: bool = False
) -> tuple[Rows, Rows, torch.Tensor, torch.Tensor]:
    """``(q_rows, kv_rows, cu_seqlens_q, cu_seqlens_k)`` of a block kind: which local rows of the query and of
    the K/V shard take part (None: all) and the packed boundaries of those rows. ``kind`` is not "skip".
    ``views``: where the half is one range of rows (padded input holding one sequence), give it as a slice, so
    the operands are views instead of index_select copies (for callers that handle slices: ring)."""
    cu = sp.cu_seqlens
    if kind not in ("k_first_half", "q_second_half"):
        return None, None, cu, cu
    if views and sp.padded_shape is not None and sp.padded_shape[0] == 1:
        half = sp.q.shape[0] // 2
        rows = slice(0, half) if kind == "k_first_half" else slice(half, 2 * half)
    else:
        rows = sp.chunk_indices("first" if kind == "k_first_half" else "second")
    if kind == "k_first_half":
        return None, rows, cu, sp.half_cu_seqlens()
    return rows, None, sp.half_cu_seqlens(), cu


def _rows(t: torch.Tensor, rows: Rows, dim: int = 0) -> torch.Tensor:
    if rows is None:
        return t
    if isinstance(rows, slice):  # a view, also of an (H, T) lse: every kernel takes lse's own strides
        return t[rows] if dim == 0 else t[:, rows]
    return t.index_select(dim, rows)


def block_options(
    sp: SoftmaxSP, kind: str, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None,
    ranks: tuple[int, int] | None,
) -> dict:
    """The kernel's ``causal`` and options for one block of ``ranks`` = (q_rank, kv_rank). With a window the
    kernel compares the rows' global positions, which carry the causal mask too, so ``causal`` is the op's."""
    if sp.window is None:
        return {"causal": kind == "causal", **sp.kernel_options()}
    options = sp.kernel_options(*ranks)
    options["q_positions"] = _rows(options["q_positions"], q_rows)
    options["k_positions"] = _rows(options["k_positions"], kv_rows)
    return {"causal": sp.causal, **options}


def attend_block(
    sp: SoftmaxSP, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, backend: str = "auto",
    ranks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Run the kernel on one block; returns ``(rows, out, lse)``: the query rows it covers (None: all), their
    partial output and LSE (H, rows). ``kind`` must not be "skip". ``ranks``: (q_rank, kv_rank), whose shards'
    positions the window compares (needed with a window)."""
    q_rows, kv_rows, cu_q, cu_k = block_operands(sp, kind)
    max_q, max_k = sp.block_max_seqlens(kind)
    out, lse = attention_block_varlen(
        _rows(q, q_rows), _rows(k, kv_rows), _rows(v, kv_rows), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        scale=sp.scale, backend=backend, max_seqlen_q=max_q, max_seqlen_k=max_k,
        **block_options(sp, kind, q_rows, kv_rows, ranks),
    )
    return q_rows, out, lse


def attend_and_merge(
    sp: SoftmaxSP,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    backend: str = "auto",
    kv_rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend this rank's queries to one K/V shard (that of ``kv_rank``: its positions, with a window) and fold
    the result into the running packed (T, H, Dv) out and (H, T) lse; in the kernel epilogue when the backend
    fuses the merge (Triton), else as a second pass. The running ``out``/``lse`` are the caller's own
    accumulators: rows of them are updated in place."""
    rows, kv_rows, cu_q, cu_k = block_operands(sp, kind, views=True)
    q, k, v = _rows(sp.q, rows), _rows(k, kv_rows), _rows(v, kv_rows)
    if rows is not None and out is None:
        acc = accumulation_dtype(q.dtype)
        out = q.new_zeros((sp.q.shape[0], q.shape[1], v.shape[-1]), dtype=acc)
        lse = torch.full((q.shape[1], sp.q.shape[0]), float("-inf"), dtype=acc, device=q.device)
    sub_out = None if out is None else _rows(out, rows)
    sub_lse = None if lse is None else _rows(lse, rows, dim=1)
    max_q, max_k = sp.block_max_seqlens(kind)
    new_out, new_lse = attention_block_merge(
        q, k, v, sub_out, sub_lse, scale=sp.scale, backend=backend,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, in_place=True,
        **block_options(sp, kind, rows, kv_rows, (sp.rank, kv_rank)),
    )
    if rows is None:
        return new_out, new_lse
    if not (isinstance(rows, slice) and new_out is sub_out):  # a slice of out was merged into where it is
        out[rows] = new_out
    lse[:, rows] = new_lse  # (lse's rows are a copy: kernels index them densely)
    return out, lse


def attend_block_backward(
    sp: SoftmaxSP,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kind: str,
    backend: str = "auto",
    ranks: tuple[int, int] | None = None,
    views: bool = False,
) -> tuple[Rows, torch.Tensor, Rows, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the FINAL out/lse of the query rows; returns
    ``(q_rows, dq, kv_rows, dk, dv)`` where rows None means all rows of the shard. ``ranks``: as
    ``attend_block``; ``views``: see ``block_operands`` (rows may then be slices)."""
    q_rows, kv_rows, cu_q, cu_k = block_operands(sp, kind, views)
    max_q, max_k = sp.block_max_seqlens(kind)
    dq, dk, dv = attention_block_varlen_backward(
        _rows(dout, q_rows), _rows(q, q_rows), _rows(k, kv_rows), _rows(v, kv_rows), _rows(out, q_rows),
        _rows(lse, q_rows, dim=1), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        scale=sp.scale, backend=backend, max_seqlen_q=max_q, max_seqlen_k=max_k,
        **block_options(sp, kind, q_rows, kv_rows, ranks),
    )
    return q_rows, dq, kv_rows, dk, dv


def merge_rows(
    out: torch.Tensor | None, lse: torch.Tensor | None, rows: torch.Tensor | None, block_out: torch.Tensor,
    block_lse: torch.Tensor, total: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block partial that covers ``rows`` (None: all) into the running packed (T, H, D) out and (H, T) lse."""
    if rows is None:
        return merge_attention_outputs(out, lse, block_out, block_lse)
    if out is None:
        acc = accumulation_dtype(block_out.dtype)
        out = block_out.new_zeros((total, *block_out.shape[1:]), dtype=acc)
        lse = torch.full((block_lse.shape[0], total), float("-inf"), dtype=acc, device=block_out.device)
    sub_out, sub_lse = merge_attention_outputs(out[rows], lse[:, rows], block_out, block_lse)
    out, lse = out.clone(), lse.clone()
    out[rows], lse[:, rows] = sub_out, sub_lse
    return out, lse


def add_rows(target: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    """``target[rows] += values`` in target's dtype (rows None: all rows)."""
    if rows is None:
        target += values
    elif isinstance(rows, slice):
        target[rows] += values
    else:
        target.index_add_(0, rows, values.to(target.dtype))


class _ScheduledAttention(torch.autograd.Function):
    """Autograd for ops with their own forward/backward schedules (ring, TokenRing): saves only q, k, v, out
    and lse, and hands the packed dout to the backward schedule. Sinks enter once, after the schedule's merge;
    the schedule's backward then runs with the final out/lse, and the sinks' gradient is this rank's rows'
    share (the single-device gradient is the sum over ranks, like every replicated parameter's)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, sp: SoftmaxSP, backend: str, forward_fn, backward_fn):
        out, lse = forward_fn(sp, backend)
        if sinks is not None:
            out, lse = apply_attention_sinks(out, lse, sinks)
        out = out.to(q.dtype)
        ctx.sp, ctx.backend, ctx.backward_fn = sp, backend, backward_fn
        ctx.save_for_backward(sp.q, sp.k, sp.v, out, lse, sinks)
        return sp.unpack(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        sp = ctx.sp
        sp.q, sp.k, sp.v = q, k, v
        dout = dout.reshape(out.shape).contiguous()
        dq, dk, dv = ctx.backward_fn(sp, dout, out, lse, ctx.backend)
        d_sinks = None if sinks is None else attention_sinks_backward(dout, out, lse, sinks)
        return sp.unpack(dq), sp.unpack(dk), sp.unpack(dv), d_sinks, None, None, None, None


def run_scheduled(q, k, v, sp: SoftmaxSP, backend: str, forward_fn, backward_fn) -> torch.Tensor:
    """Apply an op given as ``forward_fn(sp, backend) -> (packed out, lse)`` and
    ``backward_fn(sp, dout, out, lse, backend) -> (dq, dk, dv)``; differentiable in q, k, v and ``sp.sinks``."""
    return _ScheduledAttention.apply(q, k, v, sp.sinks, sp, backend, forward_fn, backward_fn)
