"""The Triton softmax-attention kernels (``@triton.jit`` only; launch code is in ``triton_attention.py``).

Flash-attention 2 structure, no S x S buffer anywhere; shapes and conventions are the contract of
``seqpar.kernels.attention``. Scores are kept in log2 units (scale * log2(e) folded into ``qk_scale``); with
``SOFTCAP`` they are capped as ``cap * tanh(s / cap)`` with ``cap = softcap * log2(e)`` (the same cap in log2
units), and the backward multiplies dS by 1 - tanh^2.

* ``_attn_fwd_kernel``: one program per (BLOCK_M query rows, sequence x head). Online softmax over key blocks;
  blocks fully below the causal diagonal run without masks, only the diagonal blocks are masked. With ``MERGE``
  the epilogue also reads a running (out_acc float32, lse_acc) for the same rows and writes the merged pair
  instead, so ring/TokenRing need no separate merge pass.
* ``_attn_bwd_preprocess_kernel``: delta = rowsum(dO * O) in float32.
* ``_attn_bwd_dkdv_kernel``: one program per (BLOCK_N keys, sequence x kv-head); loops over the q heads of its
  GQA group and over the query blocks that can see its keys, so K/V are never repeated and dK/dV need no atomics.
* ``_attn_bwd_dq_kernel``: one program per (BLOCK_M queries, sequence x head), same key range as forward.

Every kernel starts with ``_sequence_span``: packed batches (``VARLEN``) read their sequence's start and length
from cu_seqlens; padded batches are the packed form with a batch stride and start 0.

Memory contract of the launchers: the head dim is the innermost, unit-stride dim of every q/k/v/out/grad
tensor (offsets along it are added without a stride); every other dim may have any stride.

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
# Forward
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
    the diagonal/last blocks, the head dim when it is not a power of two. Mask-free loads vectorise best."""
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
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n, offs_d, seqlen_k, diag,
    qk_scale, cap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One key block of the online softmax. Scores are in log2 units (scale * log2(e) folded in)."""
    cols = start_n + offs_n
    kt = _load_kv(k_base + cols[None, :] * stride_ks + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)  # (D, N)
    s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
    if SOFTCAP:
        s = cap * _tanh(s / cap)
    if MASKED:
        visible = cols[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet has m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(v_base + cols[:, None] * stride_vs + offs_d[None, :], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                 MASKED, False)  # (N, D)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, OutAcc, LseAcc, CuQ, CuK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_ab, stride_as, stride_ah,
    stride_alb, stride_alh, stride_als,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, cap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MERGE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
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
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs

    # Key j is visible to query i when j <= i + diag (bottom-right aligned causal mask).
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        full = tl.minimum(seqlen_k, tl.maximum(m0 + diag + 1, 0))  # keys every row of this block sees
        hi = tl.minimum(seqlen_k, tl.maximum(m0 + BLOCK_M + diag, 0))  # keys any row sees
    else:
        full = seqlen_k
        hi = seqlen_k
    n_full = (full // BLOCK_N) * BLOCK_N  # whole blocks that need neither causal nor length masks

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n, offs_d, seqlen_k,
            diag, qk_scale, cap, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION, UPCAST, SOFTCAP,
        )
    for start_n in range(n_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n, offs_d, seqlen_k,
            diag, qk_scale, cap, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION, UPCAST, SOFTCAP,
        )

    # l == 0 exactly: the row saw no key (out 0, lse -inf). A NaN l (NaN input) must stay NaN, so no `l > 0`.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    out_mask = row_ok[:, None] & d_ok[None, :]
    if MERGE:
        # Merge with the running partial of the same rows (-inf safe, as merge_attention_outputs).
        acc_lse2 = tl.load(
            LseAcc + b64 * stride_alb + h * stride_alh + q_start * stride_als + offs_m * stride_als,
            mask=row_ok, other=float("-inf"),
        ) * _K_LOG2E
        acc_out = tl.load(
            OutAcc + b64 * stride_ab + h * stride_ah + q_start * stride_as
            + offs_m[:, None] * stride_as + offs_d[None, :],
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
        Out + b64 * stride_ob + h * stride_oh + q_start * stride_os + offs_m[:, None] * stride_os + offs_d[None, :],
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
    """delta = rowsum(dO * O) in float32, stored in the lse layout."""
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
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, stride_ls, start_m, offs_n,
    offs_d, seqlen_q, diag, qk_scale, cap,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One query block's contribution to dK/dV of this key block, in transposed (keys x queries) form."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    qt = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None], mask=d_ok[:, None] & row_ok[None, :],
                 other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                 other=0.0)
    # Rows past the end and rows that saw no key (lse = -inf) get lse = +inf, hence p = 0.
    lse = tl.load(lse_base + offs_m * stride_ls, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _K_LOG2E
    delta = tl.load(delta_base + offs_m * stride_ls, mask=row_ok, other=0.0)
    st = _dot(k, qt, PRECISION, UPCAST) * qk_scale  # (N, M)
    if SOFTCAP:
        tanh_t = _tanh(st / cap)
        st = cap * tanh_t
    if MASKED:  # mask before exp2: a hidden score may exceed the row's lse by far
        st = tl.where(offs_m[None, :] + diag >= offs_n[:, None], st, float("-inf"))
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
    Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    seqlen_q, seqlen_k, n_kv_heads, group, scale, qk_scale, cap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
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
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks + offs_n[:, None] * stride_ks
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs + offs_n[:, None] * stride_vs
                + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # Query i sees key j when i >= j - diag: queries before `lo` see none of this block, queries from
        # `full_lo` on see all of it; only [lo, full_lo) needs the mask.
        lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        masked_hi = tl.minimum(full_lo, seqlen_q)
    else:
        lo = 0
        full_lo = 0
        masked_hi = 0
    # Key rows past seqlen_k are zeros: their dK/dV are never stored and they add nothing elsewhere.
    for g in range(group):  # GQA: every q head of this kv head, K/V loaded once
        h = h_kv * group + g
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
        do_base = DOut + b64 * stride_db + h * stride_dh + q_start * stride_ds
        lse_base = Lse + b64 * stride_lb + h * stride_lh + q_start * stride_ls
        delta_base = Delta + b64 * stride_lb + h * stride_lh + q_start * stride_ls
        for start_m in range(lo, masked_hi, BLOCK_M):
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, stride_ls, start_m,
                offs_n, offs_d, seqlen_q, diag, qk_scale, cap, HEAD_DIM, BLOCK_M, True, PRECISION, UPCAST, SOFTCAP,
            )
        for start_m in range(full_lo, seqlen_q, BLOCK_M):
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, stride_ls, start_m,
                offs_n, offs_d, seqlen_q, diag, qk_scale, cap, HEAD_DIM, BLOCK_M, False, PRECISION, UPCAST, SOFTCAP,
            )
    dk_base = DK + b64 * stride_dkb + h_kv * stride_dkh + k_start * stride_dks
    dv_base = DV + b64 * stride_dvb + h_kv * stride_dvh + k_start * stride_dvs
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n, offs_d, seqlen_k, diag,
    qk_scale, cap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    cols = start_n + offs_n
    kt = _load_kv(k_base + cols[None, :] * stride_ks + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)  # (D, N)
    vt = _load_kv(v_base + cols[None, :] * stride_vs + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)
    s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
    if SOFTCAP:
        tanh_s = _tanh(s / cap)
        s = cap * tanh_s
    if MASKED:  # mask before exp2: a hidden score may exceed the row's lse by far
        visible = cols[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
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
    Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ls,
    stride_dqb, stride_dqs, stride_dqh,
    seqlen_q, seqlen_k, n_heads, group, scale, qk_scale, cap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
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
    row_ok = offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
    do_base = DOut + b64 * stride_db + h * stride_dh + q_start * stride_ds
    l_off = b64 * stride_lb + h * stride_lh + q_start * stride_ls
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(Lse + l_off + offs_m * stride_ls, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _K_LOG2E  # rows that saw no key: p = 0
    delta = tl.load(Delta + l_off + offs_m * stride_ls, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs

    diag = seqlen_k - seqlen_q
    if CAUSAL:
        full = tl.minimum(seqlen_k, tl.maximum(m0 + diag + 1, 0))
        hi = tl.minimum(seqlen_k, tl.maximum(m0 + BLOCK_M + diag, 0))
    else:
        full = seqlen_k
        hi = seqlen_k
    n_full = (full // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n,
                           offs_d, seqlen_k, diag, qk_scale, cap, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION, UPCAST,
                           SOFTCAP)
    for start_n in range(n_full, hi, BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n,
                           offs_d, seqlen_k, diag, qk_scale, cap, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION, UPCAST,
                           SOFTCAP)
    dq_base = DQ + b64 * stride_dqb + h * stride_dqh + q_start * stride_dqs
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask)
