"""The Triton softmax-attention kernels (``@triton.jit`` only; launch code is in ``triton_attention.py``).

Flash-attention 2 structure, no S x S buffer anywhere; shapes and conventions are the contract of
``seqpar.kernels.attention``. Scores are kept in log2 units (scale * log2(e) folded into ``qk_scale``); with
``SOFTCAP`` they are capped as ``cap * tanh(s / cap)`` with ``cap = softcap * log2(e)`` (the same cap in log2
units), and the backward multiplies dS by 1 - tanh^2. v may have its own head dim (``HEAD_DV``, MLA).

Masks are one band: query at position a sees key at position x when ``a - win_left <= x <= a + win_right``,
each side only when bounded (``LEFT``/``RIGHT``); causal is ``RIGHT`` with ``win_right = 0``, a sliding window
``(left, right)`` sets both. Positions are bottom-right aligned (query i at i + Sk - Sq, key j at j), or, with
``POSITIONS``, read from int64 position tensors (an SP block: its rows' global positions in their sequence).
Every kernel computes, per tile, which blocks of the other side the band reaches (``_block_range``: arithmetic
for aligned positions, a binary search in the sorted position tensor otherwise) and visits only those; blocks
every row sees whole run without masks. Positions that are not sorted within a sequence (a flag the launcher
computes on the device) visit every block with masks: correct, not fast.

* ``_attn_fwd_kernel``: one program per (BLOCK_M query rows, sequence x head). Online softmax over key blocks.
  With ``MERGE`` the epilogue also reads a running (out_acc float32, lse_acc) for the same rows and writes the
  merged pair instead, so ring/TokenRing need no separate merge pass.
* ``_attn_bwd_preprocess_kernel``: delta = rowsum(dO * O) in float32.
* ``_attn_bwd_dkdv_kernel``: one program per (BLOCK_N keys, sequence x kv-head); loops over the q heads of its
  GQA group and over the query blocks that can see its keys, so K/V are never repeated and dK/dV need no atomics.
* ``_attn_bwd_dq_kernel``: one program per (BLOCK_M queries, sequence x head), same key range as forward.

Every kernel starts with ``_sequence_span``: packed batches (``VARLEN``) read their sequence's start and length
from cu_seqlens; padded batches are the packed form with a batch stride and start 0.

Memory contract of the launchers: the head dim is the innermost, unit-stride dim of every q/k/v/out/grad
tensor (offsets along it are added without a stride); every other dim, and every dim of lse, delta and the
positions, may have any stride (each tensor gets its own strides).

NaN contract: a NaN in q, k or v reaches the output (and LSE) of every row that sees it. Rows that see no key
are recognised by ``l == 0`` exactly (never by ``l > 0``, which NaN fails) so NaN is not taken for "no key".
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals that are tl.constexpr instances.
_K_LOG2E = tl.constexpr(LOG2E)
_K_LN2 = tl.constexpr(LN2)
_K_BIG = tl.constexpr(1 << 62)  # beyond any position: the min/max identity of masked rows


@triton.jit
def _sequence_span(Cu, b, seqlen, VARLEN: tl.constexpr):
    """(first token as int64, length) of sequence ``b``: from cu_seqlens when VARLEN, else (0, seqlen).
    int64 start: packed batches can hold more tokens than an int32 offset times a stride can address."""
    start = b.to(tl.int64) * 0
    length = seqlen
    if VARLEN:
        first = tl.load(Cu + b)
        start = first.to(tl.int64)
        length = tl.load(Cu + b + 1) - first
    return start, length



# ----------------------------------------------------------------------------------------------------
# Shared pieces: dots, tile loads, the band mask and the block range it reaches
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation. UPCAST: the interpreter stores bf16 as uint16 and its dot would
    multiply the raw integers, so operands (already rounded to bf16) are widened first -- same numbers."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_kv(ptrs, cols, offs_d, seqlen_k, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
             TRANSPOSED: tl.constexpr):
    """Load a key/value tile ((D, N) if TRANSPOSED else (N, D)) with only the masks it needs: the key range on
    the masked blocks, the head dim when it is not a power of two. Mask-free loads vectorise best."""
    if TRANSPOSED:
        in_range = cols[None, :] < seqlen_k
        d_ok = offs_d[:, None] < HEAD_DIM
    else:
        in_range = cols[:, None] < seqlen_k
        d_ok = offs_d[None, :] < HEAD_DIM
    if MASKED:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=in_range, other=0.0)
        else:
            x = tl.load(ptrs, mask=in_range & d_ok, other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok, other=0.0)
    return x


@triton.jit
def _tanh(x):
    """tanh by the sigmoid (in every Triton version): the softcap is c * tanh(s / c)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _band(distance, win_left, win_right, LEFT: tl.constexpr, RIGHT: tl.constexpr):
    """Which (query, key) pairs at ``distance`` = query position - key position the band lets through."""
    ok = distance == distance
    if LEFT:
        ok = ok & (distance <= win_left)
    if RIGHT:
        ok = ok & (distance >= -win_right)
    return ok


@triton.jit
def _first_at_least(Pos, stride_p, n, target, offset, steps, POSITIONS: tl.constexpr):
    """The first index i in [0, n] whose position is >= ``target``: a binary search of ``steps`` (>= log2(n) + 1)
    scalar loads in the sorted positions ``Pos[i * stride_p]`` with POSITIONS, else positions are i + offset."""
    if POSITIONS:
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + n
        for _ in range(steps):
            active = lo < hi
            mid = (lo + hi) // 2
            p = tl.load(Pos + mid.to(tl.int64) * stride_p, mask=active, other=0)
            below = active & (p < target)
            hi = tl.where(active & (p >= target), mid, hi)
            lo = tl.where(below, mid + 1, lo)
        return lo
    else:
        return tl.minimum(tl.maximum(target - offset, 0), n).to(tl.int32)


@triton.jit
def _block_range(Pos, stride_p, n, a_min, a_max, offset, below, above, steps, sorted_ok, BLOCK: tl.constexpr,
                 BELOW: tl.constexpr, ABOVE: tl.constexpr, POSITIONS: tl.constexpr, TAIL_SAFE: tl.constexpr):
    """Block-aligned ``(first, full_first, full_last, last)`` of the searched side (keys for a query tile, queries
    for a key tile; n of them, positions in ``Pos`` or i + offset) that anchors at positions [a_min, a_max] can
    see: searched x is visible to anchor a when a - below <= x <= a + above (each side only when BELOW/ABOVE).
    Blocks in [first, last) are visited; those in [full_first, full_last) are seen whole by every anchor and
    need no band mask; without BELOW, first == full_first (callers drop that loop at compile time). Positions
    that are not sorted within every sequence (``sorted_ok`` == 0) visit every block, all in [full_last, last).
    TAIL_SAFE: the caller masks the searched side's length itself (dK/dV's query rows), so the partial last
    block may count as full."""
    lo = n * 0
    hi = n + 0
    full_lo = n * 0
    full_hi = n + 0
    if BELOW:
        lo = _first_at_least(Pos, stride_p, n, a_min - below, offset, steps, POSITIONS)
        full_lo = _first_at_least(Pos, stride_p, n, a_max - below, offset, steps, POSITIONS)
    if ABOVE:
        hi = _first_at_least(Pos, stride_p, n, a_max + above + 1, offset, steps, POSITIONS)
        full_hi = _first_at_least(Pos, stride_p, n, a_min + above + 1, offset, steps, POSITIONS)
    if POSITIONS:  # unsorted positions: the search found nothing meaningful; every block, masked
        unsorted = sorted_ok == 0
        lo = tl.where(unsorted, 0, lo)
        hi = tl.where(unsorted, n, hi)
        full_lo = tl.where(unsorted, 0, full_lo)
        full_hi = tl.where(unsorted, 0, full_hi)
    first = lo // BLOCK
    last = tl.maximum(tl.cdiv(hi, BLOCK), first)
    full_first = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK), first), last)
    if TAIL_SAFE:
        end = tl.where(full_hi >= n, tl.cdiv(n, BLOCK), full_hi // BLOCK)
    else:
        end = full_hi // BLOCK
    full_last = tl.minimum(tl.maximum(end, full_first), last)
    return first * BLOCK, full_first * BLOCK, full_last * BLOCK, last * BLOCK


@triton.jit
def _positions_sorted(PosSorted, POSITIONS: tl.constexpr):
    """The launcher's device-side flag (int32, 1: the positions never decrease within a sequence), 1 without
    positions. Read on the device, so the launch never waits for it."""
    ok = 1
    if POSITIONS:
        ok = tl.load(PosSorted)
    return ok


@triton.jit
def _tile_positions(pos_base, stride_p, start, offs, ok, shift, n_valid, POSITIONS: tl.constexpr):
    """(positions of a tile's rows, min and max over its ``n_valid`` valid rows): read with POSITIONS, else the
    aligned offs + shift (the tile's rows start at ``start``)."""
    if POSITIONS:
        pos = tl.load(pos_base + offs * stride_p, mask=ok, other=0)
        low = tl.min(tl.where(ok, pos, _K_BIG), 0)
        high = tl.max(tl.where(ok, pos, -_K_BIG), 0)
    else:
        pos = offs + shift
        low = start + shift
        high = start + n_valid - 1 + shift
    return pos, low, high


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs, stride_kps, start_n, offs_n, offs_d,
    offs_dv, seqlen_k, qk_scale, cap, win_left, win_right,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, POSITIONS: tl.constexpr,
):
    """One key block of the online softmax. Scores are in log2 units (scale * log2(e) folded in)."""
    cols = start_n + offs_n
    kt = _load_kv(k_base + cols[None, :] * stride_ks + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)  # (D, N)
    s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
    if SOFTCAP:
        s = cap * _tanh(s / cap)
    if MASKED:
        key_ok = cols < seqlen_k
        if POSITIONS:
            k_pos = tl.load(kpos_base + cols * stride_kps, mask=key_ok, other=0)
        else:
            k_pos = cols
        visible = key_ok[None, :] & _band(q_pos[:, None] - k_pos[None, :], win_left, win_right, LEFT, RIGHT)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet has m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(v_base + cols[:, None] * stride_vs + offs_dv[None, :], cols, offs_dv, seqlen_k, HEAD_DV, BLOCK_DV,
                 MASKED, False)  # (N, Dv)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, OutAcc, LseAcc, CuQ, CuK, QPos, KPos, PosSorted,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_ab, stride_as, stride_ah,
    stride_alb, stride_alh, stride_als,
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, cap, win_left, win_right, steps_k,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, MERGE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = False, LEFT: tl.constexpr = False, RIGHT: tl.constexpr = False,
    POSITIONS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // group
    b64 = b.to(tl.int64)
    q_start, seqlen_q = _sequence_span(CuQ, b, seqlen_q, VARLEN)
    k_start, seqlen_k = _sequence_span(CuK, b, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:  # varlen grids are sized for the longest sequence
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    q = tl.load(
        Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs
    kpos_base = KPos + b64 * stride_kpb + k_start * stride_kps

    # The rows' positions (bottom-right aligned: row i at i + Sk - Sq) and the key blocks their band reaches.
    q_pos, q_lo, q_hi = _tile_positions(QPos + b64 * stride_qpb + q_start * stride_qps, stride_qps, m0, offs_m,
                                        row_ok, seqlen_k - seqlen_q, tl.minimum(BLOCK_M, seqlen_q - m0), POSITIONS)
    first, full_first, full_last, last = _block_range(
        kpos_base, stride_kps, seqlen_k, q_lo, q_hi, 0, win_left, win_right, steps_k, _positions_sorted(PosSorted,
        POSITIONS), BLOCK_N, LEFT, RIGHT, POSITIONS, False,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if LEFT:  # keys a window's left edge cuts; without it this range is empty
        for start_n in range(first, full_first, BLOCK_N):
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs, stride_kps, start_n,
                offs_n, offs_d, offs_dv, seqlen_k, qk_scale, cap, win_left, win_right, HEAD_DIM, HEAD_DV, BLOCK_D,
                BLOCK_DV, True, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT, POSITIONS,
            )
    for start_n in range(full_first, full_last, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs, stride_kps, start_n, offs_n,
            offs_d, offs_dv, seqlen_k, qk_scale, cap, win_left, win_right, HEAD_DIM, HEAD_DV, BLOCK_D, BLOCK_DV,
            False, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT, POSITIONS,
        )
    for start_n in range(full_last, last, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs, stride_kps, start_n, offs_n,
            offs_d, offs_dv, seqlen_k, qk_scale, cap, win_left, win_right, HEAD_DIM, HEAD_DV, BLOCK_D, BLOCK_DV,
            True, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT, POSITIONS,
        )

    # l == 0 exactly: the row saw no key (out 0, lse -inf). A NaN l (NaN input) must stay NaN, so no `l > 0`.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    out_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    if MERGE:
        # Merge with the running partial of the same rows (-inf safe, as merge_attention_outputs).
        acc_lse2 = tl.load(
            LseAcc + b64 * stride_alb + h * stride_alh + q_start * stride_als + offs_m * stride_als,
            mask=row_ok, other=float("-inf"),
        ) * _K_LOG2E
        acc_out = tl.load(
            OutAcc + b64 * stride_ab + h * stride_ah + q_start * stride_as
            + offs_m[:, None] * stride_as + offs_dv[None, :],
            mask=out_mask, other=0.0,
        )
        top = tl.maximum(acc_lse2, lse2)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.math.exp2(acc_lse2 - top_safe) + tl.math.exp2(lse2 - top_safe)
        none = total == 0.0  # both partials empty; NaN (from NaN input) is not "none" and stays NaN
        new_lse2 = tl.where(none, float("-inf"), top_safe + tl.math.log2(tl.where(none, 1.0, total)))
        new_safe = tl.where(new_lse2 == float("-inf"), 0.0, new_lse2)
        out = acc_out * tl.math.exp2(acc_lse2 - new_safe)[:, None] + out * tl.math.exp2(lse2 - new_safe)[:, None]
        lse2 = new_lse2
    tl.store(
        Out + b64 * stride_ob + h * stride_oh + q_start * stride_os + offs_m[:, None] * stride_os + offs_dv[None, :],
        out.to(Out.dtype.element_ty), mask=out_mask,
    )
    tl.store(Lse + b64 * stride_lb + h * stride_lh + q_start * stride_ls + offs_m * stride_ls, lse2 * _K_LN2,
             mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut, Delta, CuQ,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32 (HEAD_DIM: the value head dim), stored in delta's own layout."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    b64 = b.to(tl.int64)
    q_start, seqlen_q = _sequence_span(CuQ, b, seqlen_q, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o_base = Out + b64 * stride_ob + h * stride_oh + q_start * stride_os
    do_base = DOut + b64 * stride_db + h * stride_dh + q_start * stride_ds
    o = tl.load(o_base + rows[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h * stride_lh + q_start * stride_ls + rows * stride_ls, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, qpos_base, stride_qs, stride_dos, stride_ls,
    stride_dls, stride_qps, start_m, offs_d, offs_dv, seqlen_q, diag, qk_scale, cap, win_left, win_right,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
    POSITIONS: tl.constexpr,
):
    """One query block's contribution to dK/dV of this key block, in transposed (keys x queries) form."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    qt = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None],
                 mask=(offs_d[:, None] < HEAD_DIM) & row_ok[None, :], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    # Rows past the end and rows that saw no key (lse = -inf) get lse = +inf, hence p = 0.
    lse = tl.load(lse_base + offs_m * stride_ls, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _K_LOG2E
    delta = tl.load(delta_base + offs_m * stride_dls, mask=row_ok, other=0.0)
    st = _dot(k, qt, PRECISION, UPCAST) * qk_scale  # (N, M)
    if SOFTCAP:
        tanh_t = _tanh(st / cap)
        st = cap * tanh_t
    if MASKED:  # mask before exp2: a hidden score may exceed the row's lse by far
        if POSITIONS:
            q_pos = tl.load(qpos_base + offs_m * stride_qps, mask=row_ok, other=0)
        else:
            q_pos = offs_m + diag
        st = tl.where(_band(q_pos[None, :] - k_pos[:, None], win_left, win_right, LEFT, RIGHT), st, float("-inf"))
    pt = tl.math.exp2(st - lse2[None, :])
    dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)
    dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:  # d(c tanh(s / c)) / ds = 1 - tanh^2
        dst = dst * (1.0 - tanh_t * tanh_t)
    dk += _dot(dst.to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, QPos, KPos, PosSorted,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ls,
    stride_dlb, stride_dlh, stride_dls,
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    seqlen_q, seqlen_k, n_kv_heads, group, scale, qk_scale, cap, win_left, win_right, steps_q,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = False, LEFT: tl.constexpr = False, RIGHT: tl.constexpr = False,
    POSITIONS: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    h_kv = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    q_start, seqlen_q = _sequence_span(CuQ, b, seqlen_q, VARLEN)
    k_start, seqlen_k = _sequence_span(CuK, b, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < seqlen_k
    k_mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    v_mask = key_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    k = tl.load(K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks + offs_n[:, None] * stride_ks
                + offs_d[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs + offs_n[:, None] * stride_vs
                + offs_dv[None, :], mask=v_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # The keys' positions and the query blocks that see them: query a sees key x when x - win_right <= a <=
    # x + win_left, so the query side is searched with the band's sides swapped. Aligned query i is at i + diag.
    diag = seqlen_k - seqlen_q
    qpos_base = QPos + b64 * stride_qpb + q_start * stride_qps
    k_pos, k_lo, k_hi = _tile_positions(KPos + b64 * stride_kpb + k_start * stride_kps, stride_kps, n0, offs_n,
                                        key_ok, 0, tl.minimum(BLOCK_N, seqlen_k - n0), POSITIONS)
    first, full_first, full_last, last = _block_range(
        qpos_base, stride_qps, seqlen_q, k_lo, k_hi, diag, win_right, win_left, steps_q, _positions_sorted(PosSorted,
        POSITIONS), BLOCK_M, RIGHT, LEFT, POSITIONS, True,
    )
    # Key rows past seqlen_k are zeros: their dK/dV are never stored and they add nothing elsewhere.
    for g in range(group):  # GQA: every q head of this kv head, K/V loaded once
        h = h_kv * group + g
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
        do_base = DOut + b64 * stride_db + h * stride_dh + q_start * stride_ds
        lse_base = Lse + b64 * stride_lb + h * stride_lh + q_start * stride_ls
        delta_base = Delta + b64 * stride_dlb + h * stride_dlh + q_start * stride_dls
        if RIGHT:  # queries the causal diagonal or a window's right edge cuts; without either this range is empty
            for start_m in range(first, full_first, BLOCK_M):
                dk, dv = _bwd_dkdv_inner(
                    dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, qpos_base, stride_qs, stride_ds,
                    stride_ls, stride_dls, stride_qps, start_m, offs_d, offs_dv, seqlen_q, diag, qk_scale, cap,
                    win_left, win_right, HEAD_DIM, HEAD_DV, BLOCK_M, True, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT,
                    POSITIONS,
                )
        for start_m in range(full_first, full_last, BLOCK_M):
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, qpos_base, stride_qs, stride_ds,
                stride_ls, stride_dls, stride_qps, start_m, offs_d, offs_dv, seqlen_q, diag, qk_scale, cap, win_left,
                win_right, HEAD_DIM, HEAD_DV, BLOCK_M, False, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT, POSITIONS,
            )
        for start_m in range(full_last, last, BLOCK_M):
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, qpos_base, stride_qs, stride_ds,
                stride_ls, stride_dls, stride_qps, start_m, offs_d, offs_dv, seqlen_q, diag, qk_scale, cap, win_left,
                win_right, HEAD_DIM, HEAD_DV, BLOCK_M, True, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT, POSITIONS,
            )
    dk_base = DK + b64 * stride_dkb + h_kv * stride_dkh + k_start * stride_dks
    dv_base = DV + b64 * stride_dvb + h_kv * stride_dvh + k_start * stride_dvs
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=k_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs, stride_kps, start_n, offs_n,
    offs_d, offs_dv, seqlen_k, qk_scale, cap, win_left, win_right,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, POSITIONS: tl.constexpr,
):
    cols = start_n + offs_n
    kt = _load_kv(k_base + cols[None, :] * stride_ks + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)  # (D, N)
    vt = _load_kv(v_base + cols[None, :] * stride_vs + offs_dv[:, None], cols, offs_dv, seqlen_k, HEAD_DV, BLOCK_DV,
                  MASKED, True)  # (Dv, N)
    s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
    if SOFTCAP:
        tanh_s = _tanh(s / cap)
        s = cap * tanh_s
    if MASKED:  # mask before exp2: a hidden score may exceed the row's lse by far
        key_ok = cols < seqlen_k
        if POSITIONS:
            k_pos = tl.load(kpos_base + cols * stride_kps, mask=key_ok, other=0)
        else:
            k_pos = cols
        visible = key_ok[None, :] & _band(q_pos[:, None] - k_pos[None, :], win_left, win_right, LEFT, RIGHT)
        s = tl.where(visible, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, vt, PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - tanh_s * tanh_s)
    dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, QPos, KPos, PosSorted,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ls,
    stride_dlb, stride_dlh, stride_dls,
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    stride_dqb, stride_dqs, stride_dqh,
    seqlen_q, seqlen_k, n_heads, group, scale, qk_scale, cap, win_left, win_right, steps_k,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = False, LEFT: tl.constexpr = False, RIGHT: tl.constexpr = False,
    POSITIONS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // group
    b64 = b.to(tl.int64)
    q_start, seqlen_q = _sequence_span(CuQ, b, seqlen_q, VARLEN)
    k_start, seqlen_k = _sequence_span(CuK, b, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
    do_base = DOut + b64 * stride_db + h * stride_dh + q_start * stride_ds
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_ds + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    lse = tl.load(Lse + b64 * stride_lb + h * stride_lh + q_start * stride_ls + offs_m * stride_ls, mask=row_ok,
                  other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _K_LOG2E  # rows that saw no key: p = 0
    delta = tl.load(Delta + b64 * stride_dlb + h * stride_dlh + q_start * stride_dls + offs_m * stride_dls,
                    mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs
    kpos_base = KPos + b64 * stride_kpb + k_start * stride_kps

    q_pos, q_lo, q_hi = _tile_positions(QPos + b64 * stride_qpb + q_start * stride_qps, stride_qps, m0, offs_m,
                                        row_ok, seqlen_k - seqlen_q, tl.minimum(BLOCK_M, seqlen_q - m0), POSITIONS)
    first, full_first, full_last, last = _block_range(
        kpos_base, stride_kps, seqlen_k, q_lo, q_hi, 0, win_left, win_right, steps_k, _positions_sorted(PosSorted,
        POSITIONS), BLOCK_N, LEFT, RIGHT, POSITIONS, False,
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if LEFT:  # keys a window's left edge cuts; without it this range is empty
        for start_n in range(first, full_first, BLOCK_N):
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs,
                               stride_kps, start_n, offs_n, offs_d, offs_dv, seqlen_k, qk_scale, cap, win_left,
                               win_right, HEAD_DIM, HEAD_DV, BLOCK_D, BLOCK_DV, True, PRECISION, UPCAST, SOFTCAP, LEFT,
                               RIGHT, POSITIONS)
    for start_n in range(full_first, full_last, BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs,
                           stride_kps, start_n, offs_n, offs_d, offs_dv, seqlen_k, qk_scale, cap, win_left, win_right,
                           HEAD_DIM, HEAD_DV, BLOCK_D, BLOCK_DV, False, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT,
                           POSITIONS)
    for start_n in range(full_last, last, BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, q_pos, k_base, v_base, kpos_base, stride_ks, stride_vs,
                           stride_kps, start_n, offs_n, offs_d, offs_dv, seqlen_k, qk_scale, cap, win_left, win_right,
                           HEAD_DIM, HEAD_DV, BLOCK_D, BLOCK_DV, True, PRECISION, UPCAST, SOFTCAP, LEFT, RIGHT,
                           POSITIONS)
    dq_base = DQ + b64 * stride_dqb + h * stride_dqh + q_start * stride_dqs
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)
