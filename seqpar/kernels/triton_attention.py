"""Triton softmax-attention block kernels: forward with LSE, backward, packed varlen, GQA, fused out/LSE merge.

Shapes and conventions are those of ``seqpar.kernels.attention`` (the contract): q (B, Sq, H, D), k/v
(B, Sk, H_kv, D) with H % H_kv == 0, out in q's dtype, lse (B, H, Sq) float32; packed form (T, H, D) with
int32 ``cu_seqlens_q``/``cu_seqlens_k`` and lse (H, T); causal is bottom-right aligned (query i sees key j
when j <= i + Sk - Sq); rows that see no key give out = 0, lse = -inf. fp16/bf16/fp32 inputs, float32
accumulation, D <= 256 (any D; non powers of two are masked).

Kernels (flash-attention 2 structure, no S x S buffer anywhere):

* ``_attn_fwd_kernel``: one program per (BLOCK_M query rows, sequence x head). Online softmax over key blocks
  in the log2 domain; blocks fully below the causal diagonal run without masks, only the diagonal blocks
  are masked. With ``MERGE`` the epilogue also reads a running (out_acc float32, lse_acc) for the same rows
  and writes the merged pair instead, so ring/TokenRing need no separate merge pass.
* ``_attn_bwd_preprocess_kernel``: delta = rowsum(dO * O) in float32.
* ``_attn_bwd_dkdv_kernel``: one program per (BLOCK_N keys, sequence x kv-head); loops over the q heads of
  its GQA group and over the query blocks that can see its keys, so K/V are never repeated and dK/dV need
  no atomics.
* ``_attn_bwd_dq_kernel``: one program per (BLOCK_M queries, sequence x head), same key range as forward.

Padded batches run as the packed form with a batch stride (``VARLEN=False``), so there is one code path.

Backends registered by ``register()``:

* ``"triton"``: CUDA devices, fp16/bf16/fp32. It is in ``attention._AUTO_ORDER``; on CPU its ``supports``
  is False, so ``backend="auto"`` on CPU still resolves to ``"torch"``.
* ``"triton_interpret"``: the same kernels on CPU tensors, only when triton was imported with
  ``TRITON_INTERPRET=1`` (the tests). It is not in ``_AUTO_ORDER``: only asking for it by name selects it.

Raises ``ValueError`` (naming the argument) for bad shapes, dtypes, head dims > 256 or bad cu_seqlens.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "register",
    "triton_attention_backward",
    "triton_attention_backward_varlen",
    "triton_attention_forward",
    "triton_attention_forward_varlen",
    "triton_attention_merge",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals that are tl.constexpr instances.
_K_LOG2E = tl.constexpr(LOG2E)
_K_LN2 = tl.constexpr(LN2)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


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
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n, offs_d, seqlen_k, diag,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key block of the online softmax. Scores are in log2 units (scale * log2(e) folded in)."""
    cols = start_n + offs_n
    kt = _load_kv(k_base + cols[None, :] * stride_ks + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)  # (D, N)
    s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
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
    seqlen_q, seqlen_k, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MERGE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // group
    b64 = b.to(tl.int64)
    q_start = b64 * 0  # token offset of this sequence (int64: packed batches can be long)
    k_start = b64 * 0
    if VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        seqlen_q = tl.load(CuQ + b + 1) - tl.load(CuQ + b)
        k_start = tl.load(CuK + b).to(tl.int64)
        seqlen_k = tl.load(CuK + b + 1) - tl.load(CuK + b)
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
            diag, qk_scale, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION, UPCAST,
        )
    for start_n in range(n_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n, offs_d, seqlen_k,
            diag, qk_scale, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION, UPCAST,
        )

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out_mask = row_ok[:, None] & d_ok[None, :]
    if MERGE:
        # Merge with the running partial of the same rows (-inf safe, as merge_attention_outputs).
        acc_lse2 = tl.load(
            LseAcc + b64 * stride_alb + h * stride_alh + q_start * stride_als + offs_m * stride_als,
            mask=row_ok, other=float("-inf"),
        ) * _K_LOG2E
        acc_out = tl.load(
            OutAcc + b64 * stride_ab + h * stride_ah + q_start * stride_as + offs_m[:, None] * stride_as + offs_d[None, :],
            mask=out_mask, other=0.0,
        )
        top = tl.maximum(acc_lse2, lse2)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.math.exp2(acc_lse2 - top_safe) + tl.math.exp2(lse2 - top_safe)
        new_lse2 = tl.where(total > 0.0, top_safe + tl.math.log2(tl.where(total > 0.0, total, 1.0)), float("-inf"))
        new_safe = tl.where(new_lse2 == float("-inf"), 0.0, new_lse2)
        out = acc_out * tl.math.exp2(acc_lse2 - new_safe)[:, None] + out * tl.math.exp2(lse2 - new_safe)[:, None]
        lse2 = new_lse2
    tl.store(
        Out + b64 * stride_ob + h * stride_oh + q_start * stride_os + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty), mask=out_mask,
    )
    tl.store(Lse + b64 * stride_lb + h * stride_lh + q_start * stride_ls + offs_m * stride_ls, lse2 * _K_LN2, mask=row_ok)


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
    q_start = b64 * 0
    if VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        seqlen_q = tl.load(CuQ + b + 1) - tl.load(CuQ + b)
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
    offs_d, seqlen_q, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One query block's contribution to dK/dV of this key block, in transposed (keys x queries) form."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    qt = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Rows past the end and rows that saw no key (lse = -inf) get lse = +inf, hence p = 0.
    lse = tl.load(lse_base + offs_m * stride_ls, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _K_LOG2E
    delta = tl.load(delta_base + offs_m * stride_ls, mask=row_ok, other=0.0)
    st = _dot(k, qt, PRECISION, UPCAST) * qk_scale  # (N, M)
    if MASKED:  # mask before exp2: a hidden score may exceed the row's lse by far
        st = tl.where(offs_m[None, :] + diag >= offs_n[:, None], st, float("-inf"))
    pt = tl.math.exp2(st - lse2[None, :])
    dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)
    dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)
    dst = pt * (dpt - delta[None, :])
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
    seqlen_q, seqlen_k, n_kv_heads, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    h_kv = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    q_start = b64 * 0  # token offset of this sequence (int64: packed batches can be long)
    k_start = b64 * 0
    if VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        seqlen_q = tl.load(CuQ + b + 1) - tl.load(CuQ + b)
        k_start = tl.load(CuK + b).to(tl.int64)
        seqlen_k = tl.load(CuK + b + 1) - tl.load(CuK + b)
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
                offs_n, offs_d, seqlen_q, diag, qk_scale, HEAD_DIM, BLOCK_M, True, PRECISION, UPCAST,
            )
        for start_m in range(full_lo, seqlen_q, BLOCK_M):
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, stride_ls, start_m,
                offs_n, offs_d, seqlen_q, diag, qk_scale, HEAD_DIM, BLOCK_M, False, PRECISION, UPCAST,
            )
    dk_base = DK + b64 * stride_dkb + h_kv * stride_dkh + k_start * stride_dks
    dv_base = DV + b64 * stride_dvb + h_kv * stride_dvh + k_start * stride_dvs
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n, offs_d, seqlen_k, diag,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    cols = start_n + offs_n
    kt = _load_kv(k_base + cols[None, :] * stride_ks + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)  # (D, N)
    vt = _load_kv(v_base + cols[None, :] * stride_vs + offs_d[:, None], cols, offs_d, seqlen_k, HEAD_DIM, BLOCK_D,
                  MASKED, True)
    s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
    if MASKED:  # mask before exp2: a hidden score may exceed the row's lse by far
        visible = cols[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, vt, PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
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
    seqlen_q, seqlen_k, n_heads, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // group
    b64 = b.to(tl.int64)
    q_start = b64 * 0  # token offset of this sequence (int64: packed batches can be long)
    k_start = b64 * 0
    if VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        seqlen_q = tl.load(CuQ + b + 1) - tl.load(CuQ + b)
        k_start = tl.load(CuK + b).to(tl.int64)
        seqlen_k = tl.load(CuK + b + 1) - tl.load(CuK + b)
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
                           offs_d, seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION, UPCAST)
    for start_n in range(n_full, hi, BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, offs_n,
                           offs_d, seqlen_k, diag, qk_scale, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION, UPCAST)
    dq_base = DQ + b64 * stride_dqb + h * stride_dqh + q_start * stride_dqs
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------

INTERPRETED: bool = type(_attn_fwd_kernel).__name__ == "InterpretedFunction"
"""True when triton was imported with TRITON_INTERPRET=1: the kernels then run on the CPU, in numpy."""

# Interpreter programs are numpy loops: small blocks keep the tests quick and still cover multi-block paths.
INTERPRETER_BLOCK = 16


def _configs(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, int]]:
    """Block sizes / warps / stages per kernel.

    GPU values: chosen without a GPU by compiling every kernel for sm_90a (H100/H200) and keeping tiles that
    ptxas fits without register spills (``ptxas -v``), near the Triton fused-attention tutorial's shapes.
    They are not tuned by measurement; bench/gpu_check.py measures them."""
    if INTERPRETED or device.type != "cuda":
        b = INTERPRETER_BLOCK
        small = {"BLOCK_M": b, "BLOCK_N": b}
        return {"fwd": small, "pre": {"BLOCK_M": b}, "dkdv": small, "dq": small}
    cfgs = _gpu_configs(head_dim)
    if dtype == torch.float32:
        # float32 is the contract's accuracy path ("ieee" dots run on FMA units, not tensor cores): small tiles
        # and one stage keep registers and shared memory bounded. Not a performance target.
        small = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        cfgs.update(fwd=dict(small), dkdv=dict(small), dq=dict(small))
    return cfgs


def _gpu_configs(head_dim: int) -> dict[str, dict[str, int]]:
    pre = {"BLOCK_M": 128, "num_warps": 4}
    if head_dim <= 64:
        return {
            "fwd": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
            "pre": pre,
            "dkdv": {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
            "dq": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
        }
    if head_dim <= 128:
        return {
            "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
            "pre": pre,
            "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
            "dq": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
        }
    return {
        "fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        "pre": pre,
        "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
        "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    }


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs must meet the contract's 1e-5: no TF32. (The interpreter's dot is numpy float32 anyway.)
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# Argument checks and layouts
# ----------------------------------------------------------------------------------------------------


class _Problem:
    """Sizes and strides of one call, padded (B, S, H, D) or packed (T, H, D) + cu_seqlens."""

    def __init__(self, q, k, v, cu_q, cu_k):
        self.varlen = cu_q is not None
        want = 3 if self.varlen else 4
        shape_doc = "(T, H, D)" if self.varlen else "(B, S, H, D)"
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != want:
                raise ValueError(f"{name}: expected {shape_doc}, got shape {tuple(t.shape)}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{name}: triton attention supports {SUPPORTED_DTYPES}, got {t.dtype}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"k, v: dtypes must match q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"v: shape {tuple(v.shape)} must equal k's {tuple(k.shape)}")
        if k.shape[-1] != q.shape[-1] or (not self.varlen and k.shape[0] != q.shape[0]):
            raise ValueError(f"k: expected q's batch and head dim {tuple(q.shape)}, got {tuple(k.shape)}")
        self.h, self.h_kv, self.d = q.shape[-2], k.shape[-2], q.shape[-1]
        if self.h_kv == 0 or self.h % self.h_kv:
            raise ValueError(f"k: q's {self.h} heads must be a multiple of k/v's {self.h_kv} heads (GQA)")
        if self.d > MAX_HEAD_DIM:
            raise ValueError(f"q: head dim {self.d} > {MAX_HEAD_DIM} is not supported by the triton kernels")
        self.group = self.h // self.h_kv
        if self.varlen:
            bq = _check_cu(cu_q, "cu_seqlens_q", q.shape[0])
            bk = _check_cu(cu_k, "cu_seqlens_k", k.shape[0])
            if len(bq) != len(bk):
                raise ValueError(f"cu_seqlens_k: {len(bk) - 1} sequences but cu_seqlens_q has {len(bq) - 1}")
            self.batch = len(bq) - 1
            self.seqlen_q = max((b - a for a, b in zip(bq, bq[1:])), default=0)
            self.seqlen_k = max((b - a for a, b in zip(bk, bk[1:])), default=0)
            self.cu_q, self.cu_k = cu_q.to(q.device), cu_k.to(q.device)
        else:
            self.batch, self.seqlen_q, self.seqlen_k = q.shape[0], q.shape[1], k.shape[1]
            self.cu_q = self.cu_k = q  # never read when VARLEN is False; any pointer will do
        self.block_d = max(16, triton.next_power_of_2(self.d))  # tl.dot needs >= 16
        self.scale = 1.0  # set by the caller

    def bsh(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, seq, head) strides of a q/k/v/out-shaped tensor."""
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def bhs(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, seq) strides of an lse-shaped tensor: (B, H, S) padded, (H, T) packed."""
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def lse_shape(self, q: torch.Tensor) -> tuple[int, ...]:
        return (self.h, q.shape[0]) if self.varlen else (q.shape[0], self.h, q.shape[1])


def _check_cu(cu: torch.Tensor, name: str, total: int) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D int32 tensor of cumulative lengths")
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name}: must start at 0, not decrease and end at {total} tokens; got {bounds[:8]}...")
    return bounds


def _lastdim_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------------


def _forward(q, k, v, cu_q, cu_k, causal, scale, out_acc=None, lse_acc=None):
    """Shared forward; with out_acc/lse_acc it merges into them and returns float32 out."""
    p = _Problem(q, k, v, cu_q, cu_k)
    q, k, v = _lastdim_contiguous(q, k, v)
    merge = out_acc is not None
    if merge:
        if out_acc.shape != q.shape:
            raise ValueError(f"out_acc: expected shape {tuple(q.shape)} like q, got {tuple(out_acc.shape)}")
        if tuple(lse_acc.shape) != p.lse_shape(q):
            raise ValueError(f"lse_acc: expected shape {p.lse_shape(q)}, got {tuple(lse_acc.shape)}")
        out_acc = _lastdim_contiguous(out_acc.to(device=q.device, dtype=torch.float32))[0]
        lse_acc = lse_acc.to(device=q.device, dtype=torch.float32)
    out = torch.empty(q.shape, dtype=torch.float32 if merge else q.dtype, device=q.device)
    lse = torch.empty(p.lse_shape(q), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or p.batch == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    acc_out, acc_lse = (out_acc, lse_acc) if merge else (out, lse)  # unread unless MERGE
    cfg = _configs(p.d, q.device, q.dtype)["fwd"]
    grid = (triton.cdiv(p.seqlen_q, cfg["BLOCK_M"]), p.batch * p.h)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, acc_out, acc_lse, p.cu_q, p.cu_k,
        *p.bsh(q), *p.bsh(k), *p.bsh(v), *p.bsh(out), *p.bhs(lse), *p.bsh(acc_out), *p.bhs(acc_lse),
        p.seqlen_q, p.seqlen_k, p.h, p.group, scale * LOG2E,
        HEAD_DIM=p.d, BLOCK_D=p.block_d, CAUSAL=bool(causal), VARLEN=p.varlen, MERGE=merge,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), **cfg,
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
    p = _Problem(q, k, v, cu_q, cu_k)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout, out: expected shape {tuple(q.shape)} like q, got {tuple(dout.shape)}, {tuple(out.shape)}")
    if tuple(lse.shape) != p.lse_shape(q):
        raise ValueError(f"lse: expected shape {p.lse_shape(q)}, got {tuple(lse.shape)}")
    q, k, v, dout, out = _lastdim_contiguous(q, k, v, dout, out)
    lse = lse.to(torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if p.batch == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(p.lse_shape(q), dtype=torch.float32, device=q.device)
    cfgs = _configs(p.d, q.device, q.dtype)
    common = dict(HEAD_DIM=p.d, BLOCK_D=p.block_d, VARLEN=p.varlen)
    pre = cfgs["pre"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(p.seqlen_q, pre["BLOCK_M"]), p.batch * p.h)](
        out, dout, delta, p.cu_q, *p.bsh(out), *p.bsh(dout), *p.bhs(delta), p.seqlen_q, p.h, **common, **pre,
    )
    common.update(CAUSAL=bool(causal), PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype))
    args = (*p.bsh(q), *p.bsh(k), *p.bsh(v), *p.bsh(dout), *p.bhs(lse))
    cfg = cfgs["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(p.seqlen_k, cfg["BLOCK_N"]), p.batch * p.h_kv)](
        q, k, v, dout, lse, delta, dk, dv, p.cu_q, p.cu_k, *args, *p.bsh(dk), *p.bsh(dv),
        p.seqlen_q, p.seqlen_k, p.h_kv, p.group, scale, scale * LOG2E, **common, **cfg,
    )
    cfg = cfgs["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(p.seqlen_q, cfg["BLOCK_M"]), p.batch * p.h)](
        q, k, v, dout, lse, delta, dq, p.cu_q, p.cu_k, *args, *p.bsh(dq),
        p.seqlen_q, p.seqlen_k, p.h, p.group, scale, scale * LOG2E, **common, **cfg,
    )
    return dq, dk, dv


def triton_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded forward: q (B, Sq, H, D), k/v (B, Sk, H_kv, D) -> out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32."""
    return _forward(q, k, v, None, None, causal, _scale(q, scale))


def triton_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, causal: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded backward -> (dq, dk, dv) in the inputs' dtypes. ``out``/``lse`` may be the final merged ones
    of a larger softmax: the result is then this block's share of the gradient."""
    return _backward(dout, q, k, v, out, lse, None, None, causal, _scale(q, scale))


def triton_attention_forward_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    *, causal: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed forward: q (Tq, H, D), k/v (Tk, H_kv, D) -> out (Tq, H, D), lse (H, Tq) float32."""
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, _scale(q, scale))


def triton_attention_backward_varlen(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed backward -> (dq, dk, dv)."""
    return _backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, _scale(q, scale))


def triton_attention_merge(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_acc: torch.Tensor | None, lse_acc: torch.Tensor | None,
    *, causal: bool = False, scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against this K/V block merged into the running ``(out_acc, lse_acc)`` inside the kernel
    epilogue. Returns new ``(out float32, lse float32)`` in q's layout (padded, or packed with cu_seqlens);
    ``out_acc=None`` starts from this block. The inputs are not modified."""
    if (out_acc is None) != (lse_acc is None):
        raise ValueError("lse_acc: pass both out_acc and lse_acc, or neither")
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, _scale(q, scale), out_acc, lse_acc)


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------


def _supports_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in SUPPORTED_DTYPES


def _supports_interpreter(device: torch.device, dtype: torch.dtype) -> bool:
    return INTERPRETED and device.type == "cpu" and dtype in SUPPORTED_DTYPES


def _backend_forward(q, k, v, *, causal, scale):
    return _forward(q, k, v, None, None, causal, scale)


def _backend_backward(dout, q, k, v, out, lse, *, causal, scale):
    return _backward(dout, q, k, v, out, lse, None, None, causal, scale)


def _backend_forward_varlen(q, k, v, cu_q, cu_k, *, causal, scale):
    return _forward(q, k, v, cu_q, cu_k, causal, scale)


def _backend_backward_varlen(dout, q, k, v, out, lse, cu_q, cu_k, *, causal, scale):
    return _backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)


def register() -> None:
    """Register ``"triton"`` (CUDA) and ``"triton_interpret"`` (CPU under TRITON_INTERPRET=1, by name only)
    attention backends and their fused merge."""
    from seqpar.kernels.attention import AttentionBackend, register_attention_backend
    from seqpar.kernels.fused_merge import register_fused_merge

    for name, supports in (("triton", _supports_cuda), ("triton_interpret", _supports_interpreter)):
        register_attention_backend(
            AttentionBackend(
                name=name, forward=_backend_forward, backward=_backend_backward, supports=supports,
                forward_varlen=_backend_forward_varlen, backward_varlen=_backend_backward_varlen,
            )
        )
        register_fused_merge(name, triton_attention_merge)

