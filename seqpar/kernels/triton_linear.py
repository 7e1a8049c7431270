"""Triton chunked linear attention with decay, initial state in, final state out; forward and backward.

Recurrence (see ``seqpar.kernels.linear``): S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t, with
g <= 0 given per token and head (the per-head and no-decay kinds are expanded to that by the caller), or per
token, head and key dimension (GLA, ``PER_KEY``: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T; b, B below are then
Dk-vectors, and the intra-chunk weights exp(b_t - b_s) differ per key dimension, so q_t . k_s is a (C, C, BK)
product summed over the key tile instead of a dot; the state, inter and gradient terms scale q or k per key
dimension before their dots).
Within a chunk of C tokens, b_t is the cumulative sum of g from the chunk start and B = b at the chunk's
last token; H_n is the state entering chunk n (H_0 = initial state).

Kernels (flash-linear-attention style: kernels here, the autograd wrapper at the bottom):

* ``_fwd_h_kernel``   H_{n+1} = exp(B) H_n + sum_s exp(B - b_s) k_s v_s^T, sequential over chunks; stores every
  H_n (float32) and the final state. One program per (K tile, V tile, batch x head).
* ``_fwd_o_kernel``   o_t = scale * (sum_{s<=t} exp(b_t - b_s) (q_t.k_s) v_s + exp(b_t) q_t^T H_n). One program
  per (V tile, chunk, batch x head).
* ``_bwd_dh_kernel``  dH_n = exp(B) dH_{n+1} + scale * sum_t exp(b_t) q_t do_t^T, reverse over chunks; stores
  dH_{n+1} per chunk and dH_0 (the initial state's gradient).
* ``_bwd_dv_kernel``  dv_s = scale * sum_{t>=s} exp(b_t - b_s) (q_t.k_s) do_t + exp(B - b_s) k_s^T dH_{n+1}.
* ``_bwd_dqk_kernel`` dq_t = scale * (sum_{s<=t} exp(b_t - b_s) (do_t.v_s) k_s + exp(b_t) H_n do_t),
  dk_s = scale * sum_{t>=s} exp(b_t - b_s) (do_t.v_s) q_t + exp(B - b_s) dH_{n+1} v_s.

The decay gradient needs no kernel: every term of the loss is exp(G_a - G_b) (or exp(G_a)) times something
linear in q_a and k_b, with G the global cumulative decay, so dL/dG_t = q_t.dq_t - k_t.dk_t (+ <S_T, dS_T> at
the last token) and dg is its reverse cumulative sum (per key dimension for GLA: the same without the sum over Dk).

Every exponent is <= 0 (g <= 0; hidden pairs are masked to -inf before exp), so nothing overflows. The states
(B, NT, H, Dk, Dv) are float32 and recomputed in backward rather than saved.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "chunk_size_for", "triton_linear_attention"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation; UPCAST for bf16 in the interpreter (it stores bf16 as uint16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _pair_decay(g, causal):
    """exp(g_t - g_s) per key dimension for the pairs s <= t of a chunk, 0 for the others: g (C, BK) cumulative
    log decays (rows t), causal (C, C) -> (C, C, BK) [t, s, d]. Every kept exponent is <= 0."""
    return tl.exp(tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], float("-inf")))


@triton.jit
def _fwd_h_kernel(
    K, V, G, H0, Hs, Ht,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    seqlen, n_heads, dim_k, dim_v, n_chunks,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, PER_KEY: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, C)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    state_mask = k_ok[:, None] & v_ok[None, :]
    state_off = offs_k[:, None] * dim_v + offs_v[None, :]  # states are contiguous (.., Dk, Dv)
    state = tl.zeros([BK, BV], tl.float32)
    if USE_H0:
        state += tl.load(H0 + (b * n_heads + h) * dim_k * dim_v + state_off, mask=state_mask, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    g_base = G + b * stride_gb + h * stride_gh
    for n in range(n_chunks):
        # Hs is (B, NT, H, Dk, Dv): the state entering chunk n.
        tl.store(Hs + ((b * n_chunks + n) * n_heads + h) * dim_k * dim_v + state_off, state, mask=state_mask)
        t = n * C + offs_c
        t_ok = t < seqlen
        kt = tl.load(k_base + t[None, :] * stride_ks + offs_k[:, None], mask=k_ok[:, None] & t_ok[None, :], other=0.0)
        v = tl.load(v_base + t[:, None] * stride_vs + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        if USE_G:
            last = tl.minimum(n * C + C, seqlen) - 1
            if PER_KEY:  # GLA: every key row of the state decays by its own factor
                gt = tl.load(g_base + t[None, :] * stride_gs + offs_k[:, None], mask=k_ok[:, None] & t_ok[None, :],
                             other=0.0)
                g_last = tl.load(g_base + last * stride_gs + offs_k, mask=k_ok, other=0.0)
                state = state * tl.exp(g_last)[:, None]
                kt = (kt * tl.exp(g_last[:, None] - gt)).to(v.dtype)
            else:
                g = tl.load(g_base + t * stride_gs, mask=t_ok, other=0.0)
                g_last = tl.load(g_base + last * stride_gs)
                state = state * tl.exp(g_last)
                kt = (kt * tl.exp(g_last - g)[None, :]).to(v.dtype)
        state += _dot(kt, v, PRECISION, UPCAST)
    if STORE_FINAL:
        tl.store(Ht + (b * n_heads + h) * dim_k * dim_v + state_off, state, mask=state_mask)


@triton.jit
def _fwd_o_kernel(
    Q, K, V, G, Hs, O,  # noqa: E741
    stride_qb, stride_qs, stride_qh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    seqlen, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PER_KEY: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """q and k share strides (same shape); o shares v's. With PER_KEY (GLA) the decay weighs every key
    dimension of q_t . k_s by its own exp(b_t - b_s): a (C, C, BK) product summed over BK, not a dot."""
    i_v = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    offs_c = tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    t = n * C + offs_c
    t_ok = t < seqlen
    v_ok = offs_v < dim_v
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_qb + h * stride_qh
    h_base = Hs + ((b * n_chunks + n) * n_heads + h) * dim_k * dim_v
    acc_o = tl.zeros([C, BV], tl.float32)
    acc_s = tl.zeros([C, C], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    for k0 in range(0, dim_k, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < dim_k
        q = tl.load(q_base + t[:, None] * stride_qs + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        state = tl.load(h_base + offs_k[:, None] * dim_v + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :],
                        other=0.0)
        if PER_KEY:
            g = tl.load(G + b * stride_gb + h * stride_gh + t[:, None] * stride_gs + offs_k[None, :],
                        mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            k = tl.load(k_base + t[:, None] * stride_qs + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc_o += _dot((q * tl.exp(g)).to(q.dtype), state.to(q.dtype), PRECISION, UPCAST)
            acc_s += tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :] * _pair_decay(g, causal), 2)
        else:
            kt = tl.load(k_base + t[None, :] * stride_qs + offs_k[:, None], mask=k_ok[:, None] & t_ok[None, :],
                         other=0.0)
            acc_o += _dot(q, state.to(q.dtype), PRECISION, UPCAST)
            acc_s += _dot(q, kt, PRECISION, UPCAST)
    if PER_KEY:
        acc_s = tl.where(causal, acc_s, 0.0)
    elif USE_G:
        g = tl.load(G + b * stride_gb + h * stride_gh + t * stride_gs, mask=t_ok, other=0.0)
        acc_o = acc_o * tl.exp(g)[:, None]
        acc_s = acc_s * tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
    else:
        acc_s = tl.where(causal, acc_s, 0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + t[:, None] * stride_vs + offs_v[None, :],
                mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    o = (acc_o + _dot(acc_s.to(v.dtype), v, PRECISION, UPCAST)) * scale
    tl.store(O + b * stride_vb + h * stride_vh + t[:, None] * stride_vs + offs_v[None, :], o.to(O.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _bwd_dh_kernel(
    Q, DO, G, DHt, DHs, DH0,
    stride_qb, stride_qs, stride_qh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    seqlen, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, PER_KEY: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """do shares v's strides."""
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, C)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    state_mask = k_ok[:, None] & v_ok[None, :]
    state_off = offs_k[:, None] * dim_v + offs_v[None, :]
    dh = tl.zeros([BK, BV], tl.float32)
    if USE_DHT:
        dh += tl.load(DHt + (b * n_heads + h) * dim_k * dim_v + state_off, mask=state_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_vb + h * stride_vh
    g_base = G + b * stride_gb + h * stride_gh
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        # DHs[n] is the gradient of the state leaving chunk n (H_{n+1}).
        tl.store(DHs + ((b * n_chunks + n) * n_heads + h) * dim_k * dim_v + state_off, dh, mask=state_mask)
        t = n * C + offs_c
        t_ok = t < seqlen
        qt = tl.load(q_base + t[None, :] * stride_qs + offs_k[:, None], mask=k_ok[:, None] & t_ok[None, :], other=0.0)
        do = tl.load(do_base + t[:, None] * stride_vs + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        qt = qt.to(tl.float32) * scale  # widen first: bf16 * scalar would stay bf16
        if USE_G:
            last = tl.minimum(n * C + C, seqlen) - 1
            if PER_KEY:
                gt = tl.load(g_base + t[None, :] * stride_gs + offs_k[:, None], mask=k_ok[:, None] & t_ok[None, :],
                             other=0.0)
                g_last = tl.load(g_base + last * stride_gs + offs_k, mask=k_ok, other=0.0)
                dh = dh * tl.exp(g_last)[:, None]
                qt = qt * tl.exp(gt)
            else:
                g = tl.load(g_base + t * stride_gs, mask=t_ok, other=0.0)
                g_last = tl.load(g_base + last * stride_gs)
                dh = dh * tl.exp(g_last)
                qt = qt * tl.exp(g)[None, :]
        dh += _dot(qt.to(do.dtype), do, PRECISION, UPCAST)
    if STORE_DH0:
        tl.store(DH0 + (b * n_heads + h) * dim_k * dim_v + state_off, dh, mask=state_mask)


@triton.jit
def _bwd_dv_kernel(
    Q, K, G, DO, DHs, DV,
    stride_qb, stride_qs, stride_qh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    seqlen, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PER_KEY: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """q, k share strides; do, dv share v's strides. Rows are key positions s, columns query positions t."""
    i_v = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    offs_c = tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    t = n * C + offs_c
    t_ok = t < seqlen
    v_ok = offs_v < dim_v
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_qb + h * stride_qh
    dh_base = DHs + ((b * n_chunks + n) * n_heads + h) * dim_k * dim_v
    acc_a = tl.zeros([C, C], tl.float32)  # k_s . q_t
    acc_dv = tl.zeros([C, BV], tl.float32)  # k_s^T dH_{n+1}
    later = offs_c[:, None] <= offs_c[None, :]  # s <= t
    causal = offs_c[:, None] >= offs_c[None, :]
    for k0 in range(0, dim_k, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < dim_k
        k = tl.load(k_base + t[:, None] * stride_qs + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        dh = tl.load(dh_base + offs_k[:, None] * dim_v + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        if PER_KEY:
            g_base = G + b * stride_gb + h * stride_gh
            g = tl.load(g_base + t[:, None] * stride_gs + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0)
            g_last = tl.load(g_base + (tl.minimum(n * C + C, seqlen) - 1) * stride_gs + offs_k, mask=k_ok, other=0.0)
            q = tl.load(q_base + t[:, None] * stride_qs + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0)
            # [t, s, d] pairs summed over d, transposed to rows s
            qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :] * _pair_decay(g, causal), 2)
            acc_a += tl.trans(qk)
            acc_dv += _dot((k * tl.exp(g_last[None, :] - g)).to(k.dtype), dh.to(k.dtype), PRECISION, UPCAST)
        else:
            qt = tl.load(q_base + t[None, :] * stride_qs + offs_k[:, None], mask=k_ok[:, None] & t_ok[None, :],
                         other=0.0)
            acc_a += _dot(k, qt, PRECISION, UPCAST)
            acc_dv += _dot(k, dh.to(k.dtype), PRECISION, UPCAST)
    if PER_KEY:
        acc_a = tl.where(later, acc_a, 0.0)
    elif USE_G:
        g_base = G + b * stride_gb + h * stride_gh
        g = tl.load(g_base + t * stride_gs, mask=t_ok, other=0.0)
        g_last = tl.load(g_base + (tl.minimum(n * C + C, seqlen) - 1) * stride_gs)
        acc_dv = acc_dv * tl.exp(g_last - g)[:, None]
        acc_a = acc_a * tl.exp(tl.where(later, g[None, :] - g[:, None], float("-inf")))
    else:
        acc_a = tl.where(later, acc_a, 0.0)
    do = tl.load(DO + b * stride_vb + h * stride_vh + t[:, None] * stride_vs + offs_v[None, :],
                 mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    dv = acc_dv + scale * _dot(acc_a.to(do.dtype), do, PRECISION, UPCAST)
    tl.store(DV + b * stride_vb + h * stride_vh + t[:, None] * stride_vs + offs_v[None, :], dv.to(DV.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _bwd_dqk_kernel(
    Q, K, V, G, DO, Hs, DHs, DQ, DK,
    stride_qb, stride_qs, stride_qh,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gs, stride_gh,
    seqlen, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PER_KEY: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """q, k, dq, dk share strides (dq/dk are float32 buffers allocated like q); v, do share strides."""
    i_k = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    offs_c = tl.arange(0, C)
    offs_k = i_k * BK + tl.arange(0, BK)
    t = n * C + offs_c
    t_ok = t < seqlen
    k_ok = offs_k < dim_k
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_vb + h * stride_vh
    state_base = ((b * n_chunks + n) * n_heads + h) * dim_k * dim_v
    acc_dp = tl.zeros([C, C], tl.float32)  # do_t . v_s
    acc_dq = tl.zeros([C, BK], tl.float32)  # do_t H_n^T
    acc_dk = tl.zeros([C, BK], tl.float32)  # v_s dH_{n+1}^T
    for v0 in range(0, dim_v, BV):
        offs_v = v0 + tl.arange(0, BV)
        v_ok = offs_v < dim_v
        do = tl.load(do_base + t[:, None] * stride_vs + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        v = tl.load(v_base + t[:, None] * stride_vs + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        st_off = offs_v[:, None] + offs_k[None, :] * dim_v  # (BV, BK) view of the transposed state tile
        st_mask = v_ok[:, None] & k_ok[None, :]
        ht = tl.load(Hs + state_base + st_off, mask=st_mask, other=0.0)
        dht = tl.load(DHs + state_base + st_off, mask=st_mask, other=0.0)
        acc_dp += _dot(do, tl.trans(v), PRECISION, UPCAST)
        acc_dq += _dot(do, ht.to(do.dtype), PRECISION, UPCAST)
        acc_dk += _dot(v, dht.to(v.dtype), PRECISION, UPCAST)
    causal = offs_c[:, None] >= offs_c[None, :]  # rows t, columns s: s <= t
    qk_mask = t_ok[:, None] & k_ok[None, :]
    q_off = b * stride_qb + h * stride_qh + t[:, None] * stride_qs + offs_k[None, :]
    q = tl.load(Q + q_off, mask=qk_mask, other=0.0)
    k = tl.load(K + q_off, mask=qk_mask, other=0.0)
    if PER_KEY:  # dq_t[d] = sum_s ds[t, s] exp(b_t[d] - b_s[d]) k_s[d]; dk_s[d] likewise over t with q_t[d]
        g_base = G + b * stride_gb + h * stride_gh
        g = tl.load(g_base + t[:, None] * stride_gs + offs_k[None, :], mask=qk_mask, other=0.0)
        g_last = tl.load(g_base + (tl.minimum(n * C + C, seqlen) - 1) * stride_gs + offs_k, mask=k_ok, other=0.0)
        weights = tl.where(causal, acc_dp, 0.0)[:, :, None] * _pair_decay(g, causal)  # [t, s, d]
        dq = scale * (tl.sum(weights * k.to(tl.float32)[None, :, :], 1) + acc_dq * tl.exp(g))
        dk = scale * tl.sum(weights * q.to(tl.float32)[:, None, :], 0) + acc_dk * tl.exp(g_last[None, :] - g)
    else:
        if USE_G:
            g_base = G + b * stride_gb + h * stride_gh
            g = tl.load(g_base + t * stride_gs, mask=t_ok, other=0.0)
            g_last = tl.load(g_base + (tl.minimum(n * C + C, seqlen) - 1) * stride_gs)
            acc_dq = acc_dq * tl.exp(g)[:, None]
            acc_dk = acc_dk * tl.exp(g_last - g)[:, None]
            ds = acc_dp * tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
        else:
            ds = tl.where(causal, acc_dp, 0.0)
        dq = scale * (_dot(ds.to(k.dtype), k, PRECISION, UPCAST) + acc_dq)
        dk = scale * _dot(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST) + acc_dk
    tl.store(DQ + q_off, dq, mask=qk_mask)
    tl.store(DK + q_off, dk, mask=qk_mask)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------

INTERPRETED: bool = type(_fwd_h_kernel).__name__ == "InterpretedFunction"


def chunk_size_for(chunk_size: int, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
                   *, per_key: bool = False) -> int:
    """The Triton chunk: a power of two in [16, 128] (tl.dot needs >= 16), at most 32 for float32 on a GPU
    (its "ieee" dots run on FMA units and larger tiles spill), 16 on a GPU for a per-key (GLA) decay (its
    intra-chunk weights are a (C, C, BK) tile). The chunk size changes rounding only, never the result, so a
    requested size is rounded rather than refused."""
    chunk = min(128, max(16, triton.next_power_of_2(int(chunk_size))))
    on_gpu = device is not None and device.type == "cuda" and not INTERPRETED
    if dtype == torch.float32 and on_gpu:
        chunk = min(chunk, 32)
    if per_key and on_gpu:
        chunk = 16
    return chunk


def _tile(dim: int) -> int:
    return min(64, max(16, triton.next_power_of_2(dim)))


def _tiles(dim_k: int, dim_v: int, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """Tiles of the chunk-parallel kernels (one program per chunk and tile). GPU tile sizes were checked by
    compiling for sm_90a (bench/gpu_check.py --compile-only): no spills for bf16/fp16."""
    tiles = {"BK": _tile(dim_k), "BV": _tile(dim_v)}
    if dtype == torch.float32 and not INTERPRETED and device.type == "cuda":
        tiles = {name: min(size, 32) for name, size in tiles.items()}
    return tiles


def _state_tiles(dim_k: int, dim_v: int, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """Tiles of the state kernels, which are sequential over chunks: on a GPU, narrower V tiles give more
    programs (B * H * tiles) to fill the SMs."""
    tiles = _tiles(dim_k, dim_v, device, dtype)
    if not INTERPRETED and device.type == "cuda":
        tiles["BV"] = min(tiles["BV"], 32)
    return tiles


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _kernel_flags(dtype: torch.dtype) -> dict:
    return {"PRECISION": _precision(dtype), "UPCAST": INTERPRETED and dtype == torch.bfloat16}


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _chunk_cumsum(g: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cumulative sum of g (B, S, H) or (B, S, H, Dk) restarting at every chunk, float32, contiguous."""
    b, s = g.shape[:2]
    rest = g.shape[2:]
    n_chunks = triton.cdiv(s, chunk)
    padded = torch.nn.functional.pad(g.float(), (0, 0) * len(rest) + (0, n_chunks * chunk - s))
    return padded.view(b, n_chunks, chunk, *rest).cumsum(2).view(b, n_chunks * chunk, *rest)[:, :s].contiguous()


def _fwd_states(k, v, gc, h0, chunk, store_final):
    """(Hs (B, NT, H, Dk, Dv) float32, final state (B, H, Dk, Dv) float32 or None)."""
    b, s, h, dk = k.shape
    dv = v.shape[-1]
    n_chunks = triton.cdiv(s, chunk)
    hs = torch.empty(b, n_chunks, h, dk, dv, dtype=torch.float32, device=k.device)
    ht = torch.empty(b, h, dk, dv, dtype=torch.float32, device=k.device) if store_final else hs
    tiles = _state_tiles(dk, dv, k.device, k.dtype)
    g_arg = gc if gc is not None else k
    grid = (triton.cdiv(dk, tiles["BK"]), triton.cdiv(dv, tiles["BV"]), b * h)
    _fwd_h_kernel[grid](
        k, v, g_arg, h0 if h0 is not None else hs, hs, ht,
        *_strides3(k), *_strides3(v), *(_strides3(gc) if gc is not None else (0, 0, 0)),
        s, h, dk, dv, n_chunks,
        C=chunk, USE_G=gc is not None, PER_KEY=_per_key(gc), USE_H0=h0 is not None, STORE_FINAL=store_final,
        **tiles,
        **_kernel_flags(k.dtype),
    )
    return hs, (ht if store_final else None)


def _g_strides(gc):
    return _strides3(gc) if gc is not None else (0, 0, 0)


def _per_key(gc: torch.Tensor | None) -> bool:
    """A GLA decay (B, S, H, Dk): its last dim is contiguous (stride 1), the kernels index it by key dim."""
    return gc is not None and gc.dim() == 4


# ----------------------------------------------------------------------------------------------------
# Autograd wrapper
# ----------------------------------------------------------------------------------------------------


class _ChunkLinearAttention(torch.autograd.Function):
    """(q, k, v, g or None, h0 or None) -> (o, final_state). g is the per-token log decay (B, S, H), or per
    token and key dimension (B, S, H, Dk) (GLA)."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, chunk):
        q, k, v = (t.contiguous() for t in (q, k, v))
        b, s, h, dk = q.shape
        dv = v.shape[-1]
        gc = _chunk_cumsum(g, chunk) if g is not None else None
        h0c = h0.float().contiguous() if h0 is not None else None
        hs, ht = _fwd_states(k, v, gc, h0c, chunk, store_final=True)
        o = torch.empty(b, s, h, dv, dtype=q.dtype, device=q.device)
        tiles = _tiles(dk, dv, q.device, q.dtype)
        n_chunks = hs.shape[1]
        _fwd_o_kernel[(triton.cdiv(dv, tiles["BV"]), n_chunks, b * h)](
            q, k, v, gc if gc is not None else q, hs, o,
            *_strides3(q), *_strides3(v), *_g_strides(gc),
            s, h, dk, dv, n_chunks, scale,
            C=chunk, USE_G=gc is not None, PER_KEY=_per_key(gc), **tiles, **_kernel_flags(q.dtype),
        )
        ctx.save_for_backward(q, k, v, gc, h0c, ht)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.has_g, ctx.h0_dtype = g is not None, (h0.dtype if h0 is not None else None)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, h0c, ht = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        b, s, h, dk = q.shape
        dv_dim = v.shape[-1]
        if do is None:
            do = torch.zeros(b, s, h, dv_dim, dtype=q.dtype, device=q.device)
        do = do.to(q.dtype).contiguous()
        dht_c = dht.float().contiguous() if dht is not None else None
        use_g = gc is not None
        flags = _kernel_flags(q.dtype)
        hs, _ = _fwd_states(k, v, gc, h0c, chunk, store_final=False)  # recomputed, not saved
        n_chunks = hs.shape[1]
        dhs = torch.empty_like(hs)
        dh0 = torch.empty(b, h, dk, dv_dim, dtype=torch.float32, device=q.device) if h0c is not None else dhs
        gs = _g_strides(gc)
        g_arg = gc if use_g else q
        st = _state_tiles(dk, dv_dim, q.device, q.dtype)
        _bwd_dh_kernel[(triton.cdiv(dk, st["BK"]), triton.cdiv(dv_dim, st["BV"]), b * h)](
            q, do, g_arg, dht_c if dht_c is not None else dhs, dhs, dh0,
            *_strides3(q), *_strides3(do), *gs, s, h, dk, dv_dim, n_chunks, scale,
            C=chunk, USE_G=use_g, PER_KEY=_per_key(gc), USE_DHT=dht_c is not None, STORE_DH0=h0c is not None,
            **st, **flags,
        )
        tiles = _tiles(dk, dv_dim, q.device, q.dtype)
        dv = torch.empty_like(v)
        _bwd_dv_kernel[(triton.cdiv(dv_dim, tiles["BV"]), n_chunks, b * h)](
            q, k, g_arg, do, dhs, dv, *_strides3(q), *_strides3(do), *gs, s, h, dk, dv_dim, n_chunks, scale,
            C=chunk, USE_G=use_g, PER_KEY=_per_key(gc), **tiles, **flags,
        )
        # dq/dk in float32: the decay gradient below is a difference of their dot products with q and k.
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk_ = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        _bwd_dqk_kernel[(triton.cdiv(dk, tiles["BK"]), n_chunks, b * h)](
            q, k, v, g_arg, do, hs, dhs, dq, dk_, *_strides3(q), *_strides3(do), *gs, s, h, dk, dv_dim, n_chunks,
            scale, C=chunk, USE_G=use_g, PER_KEY=_per_key(gc), **tiles, **flags,
        )
        dg = None
        if use_g and ctx.needs_input_grad[3]:
            d_cum = q.float() * dq - k.float() * dk_  # dL/dG_t per key dim, (B, S, H, Dk)
            if not _per_key(gc):
                d_cum = d_cum.sum(-1)  # one decay for all key dims: (B, S, H)
            dg = d_cum.flip(1).cumsum(1).flip(1)
            if dht_c is not None:  # the final state is exp(G_T) * (...): every g_u shifts it
                shift = (ht * dht_c).sum(-1)  # (B, H, Dk)
                dg = dg + (shift if _per_key(gc) else shift.sum(-1))[:, None]
        dh0_out = dh0.to(ctx.h0_dtype) if h0c is not None else None
        return dq.to(q.dtype), dk_.to(k.dtype), dv, dg, dh0_out, None, None


def triton_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable chunked linear attention on the Triton kernels; same contract as
    ``seqpar.kernels.linear.linear_attention_chunk`` (call that with ``backend="triton"``; it validates).

    Shapes: q, k (B, S, H, Dk); v (B, S, H, Dv); log_decay None, (H,), (B, S, H) or (B, S, H, Dk) (GLA), <= 0;
    initial_state
    (B, H, Dk, Dv); returns o (B, S, H, Dv) in q's dtype and the final state (B, H, Dk, Dv) float32 (None
    unless ``output_final_state``). Gradients flow to q, k, v, log_decay and initial_state.

    Raises:
        ValueError: dtype not fp16/bf16/fp32.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: triton linear attention supports {SUPPORTED_DTYPES}, got {q.dtype}")
    b, s, h, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    chunk = chunk_size_for(chunk_size, q.dtype, q.device, per_key=log_decay is not None and log_decay.dim() == 4)
    g = None
    if log_decay is not None:  # every scalar kind as (B, S, H); expand's autograd sums the per-head gradient back
        g = log_decay.float()[None, None, :].expand(b, s, h) if log_decay.dim() == 1 else log_decay.float()
    if s == 0:
        o = q.new_zeros(b, 0, h, v.shape[-1])
        final = (initial_state.float() if initial_state is not None
                 else q.new_zeros(b, h, dk, v.shape[-1], dtype=torch.float32))
        return o, (final if output_final_state else None)
    o, final = _ChunkLinearAttention.apply(q, k, v, g, initial_state, scale, chunk)
    return o, (final if output_final_state else None)


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    """By name: CUDA, or CPU tensors when the kernels run in the interpreter (TRITON_INTERPRET=1, the tests)."""
    return dtype in SUPPORTED_DTYPES and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


def _auto_eligible(device: torch.device, dtype: torch.dtype) -> bool:
    """For ``backend="auto"``: only where the kernels are the fast choice (compiled, on CUDA)."""
    return dtype in SUPPORTED_DTYPES and device.type == "cuda" and not INTERPRETED


def register() -> None:
    """Register the ``"triton"`` linear-attention backend (``backend="auto"`` picks it on CUDA only)."""
    from seqpar.kernels.linear import LinearBackend, register_linear_backend

    register_linear_backend(
        LinearBackend(
            name="triton", chunk=triton_linear_attention, supports=_supports, auto_eligible=_auto_eligible,
            needs="triton, fp16/bf16/fp32, and CUDA or TRITON_INTERPRET=1", key_decay=True,
        )
    )
