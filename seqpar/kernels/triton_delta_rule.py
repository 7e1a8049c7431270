"""Triton chunked gated delta rule (Gated DeltaNet, Kimi Delta Attention): forward and backward.

Same convention and chunked (WY / UT) form as ``seqpar.kernels.delta_rule`` (read its docstring first): per head

    S_t = (I - beta_t k_t k_t^T) G_t S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t,

G_t = exp(g_t) per head (GDN, g (B, S, H)), per key row (KDA, ``PER_KEY``, g (B, S, H, Dk)), or I (no gate).
Per chunk of C tokens entering with state H (Dk, Dv), c = the chunk-local cumulative log decay, gamma = exp(c),
[x, y]_ti = sum_d x_t[d] y_i[d] exp(c_t[d] - c_i[d]):

    M_ti = beta_t [k, k]_ti (i < t),   T = (I + M)^-1,   W = T (beta K*gamma),   U0 = T (beta V)
    u = U0 - W H,   O = scale (Q*gamma) H + A u  (A_ti = scale [q, k]_ti, i <= t),
    H' = gamma_C H + (K * exp(c_C - c))^T u

Kernels (flash-linear-attention's structure; the autograd wrapper is at the bottom):

* ``_prep_kernel``   chunk-parallel: M, T (forward substitution, row by row), A, W, U0. Stores T, A (C x C per
  chunk), W (like k) and U0 (like v), all float32.
* ``_fwd_h_kernel``  sequential over chunks, one program per (V tile, batch x head): stores every entering state
  H_n, the chunk's new values u = U0 - W H_n, and the final state.
* ``_fwd_o_kernel``  chunk-parallel: O = scale (Q*gamma) H_n + A u.
* ``_bwd_dh_kernel`` reverse over chunks (Kd = K * exp(c_C - c)): du = A^T dO + Kd dH',
  dH = scale (Q*gamma)^T dO + gamma_C dH' - W^T du; stores dH' per chunk, du, and dH_0 (the initial state's
  gradient).
* ``_bwd_chunk_kernel`` chunk-parallel: everything else from (H, dH', u, du, dO): dq, dk, dv, dbeta and the
  gradient of the chunk-local cumulative decay dc, through T (dM = -T^T dT T^T) and every decayed product.

The decay's gradient: every place c enters is a product x_t y_i exp(c_t - c_i) or x_t exp(+-c), so dL/dc_t is a
sum of (decayed input) * (its gradient) terms, collected per chunk in ``_bwd_chunk_kernel``; dg is then the
reverse cumulative sum of dc inside each chunk (torch, O(S Dk)). The gate is cumsum'd in torch per chunk and
padded to whole chunks by repeating the last value, so padded rows have c = c_last: no exponent is ever > 0 and
the chunk's last row carries the chunk decay. The key tile holds all of Dk (Dk <= 256; contractions over Dk
happen inside one program); values are tiled. Everything is computed in float32 (half inputs are widened on
load; their dots run as TF32 on a GPU). Backward saves only the inputs and the cumsum'd gate and recomputes
T, A, W, U0, H_n and u with the two forward kernels.

GPU status: tested under TRITON_INTERPRET=1 only; compiled for sm_90a at Dk = Dv = 128 (bench/gpu_check.py
--compile-only: every kernel within the shared-memory limit with ``launch_options`` and C <= 32; the chunk
kernels spill registers). Not yet run or timed on a GPU (bench/gpu_check.py has the checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "SUPPORTED_DTYPES", "delta_rule_chunk_size", "kernel_for_backend",
           "triton_chunk_gated_delta_rule", "triton_delta_rule_supported"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM_K = 256


@triton.jit
def _load_rows(base, t, t_ok, offs, ok, row_stride):
    """(C, BX) float32 tile of rows t of a (.., S, .., X) tensor whose rows are ``row_stride`` apart."""
    return tl.load(base + t[:, None] * row_stride + offs[None, :], mask=t_ok[:, None] & ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _pair_decay(g, causal):
    """exp(g_t[d] - g_i[d]) for the pairs i <= t, 0 otherwise: g (C, BK) -> (C, C, BK) [t, i, d]."""
    return tl.exp(tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], float("-inf")))


@triton.jit
def _prep_kernel(
    Q, K, V, BETA, G, T_out, A_out, W_out, U_out,
    seqlen, padded_len, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, PER_KEY: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (chunk, batch x head). q, k, W are (B, S, H, Dk), v, U0 (B, S, H, Dv) contiguous; g is
    (B, S_pad, H[, Dk]) float32; T and A are (B, H, NT, C, C)."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    t = (n * C + offs_c).to(tl.int64)  # row offsets t * H * D can pass 2^31
    t_ok = t < seqlen
    k_ok = offs_k < dim_k
    qk_base = (b * seqlen * n_heads + h) * dim_k
    q = _load_rows(Q + qk_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
    k = _load_rows(K + qk_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
    beta = tl.load(BETA + (b * seqlen + t) * n_heads + h, mask=t_ok, other=0.0).to(tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    if USE_G:
        if PER_KEY:
            g = tl.load(G + (b * padded_len * n_heads + h) * dim_k + t[:, None] * n_heads * dim_k + offs_k[None, :],
                        mask=k_ok[None, :], other=0.0)
            pair = _pair_decay(g, causal)
            kk = tl.sum(k[:, None, :] * k[None, :, :] * pair, 2)
            qk = tl.sum(q[:, None, :] * k[None, :, :] * pair, 2)
            k_gamma = k * tl.exp(g)
        else:
            g = tl.load(G + (b * padded_len + t) * n_heads + h)
            pair = tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
            kk = tl.dot(k, tl.trans(k), input_precision=PRECISION) * pair
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * pair
            k_gamma = k * tl.exp(g)[:, None]
    else:
        kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        k_gamma = k
    minus_m = tl.where(strict, -kk * beta[:, None], 0.0)
    # (I + M)^-1 = I + X, X strictly lower: X_i = -M_i - sum_{j<i} M_ij X_j, one row at a time (rows >= i of
    # X still hold -M but meet a zero coefficient, as M_ij = 0 for j >= i).
    x = minus_m
    for i in range(1, C):
        row = tl.sum(tl.where(offs_c[:, None] == i, minus_m, 0.0), 0)
        row = row + tl.sum(row[:, None] * x, 0)
        x = tl.where(offs_c[:, None] == i, row[None, :], x)
    tri = x + tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    cc_off = (i_bh.to(tl.int64) * n_chunks + n) * C * C + offs_c[:, None] * C + offs_c[None, :]
    tl.store(T_out + cc_off, tri)
    tl.store(A_out + cc_off, tl.where(causal, qk * scale, 0.0))
    w = tl.dot(tri, k_gamma * beta[:, None], input_precision=PRECISION)
    tl.store(W_out + qk_base + t[:, None] * n_heads * dim_k + offs_k[None, :], w, mask=t_ok[:, None] & k_ok[None, :])
    v_base = (b * seqlen * n_heads + h) * dim_v
    for v0 in range(0, dim_v, BV):
        offs_v = v0 + tl.arange(0, BV)
        v_ok = offs_v < dim_v
        v = _load_rows(V + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
        u0 = tl.dot(tri, v * beta[:, None], input_precision=PRECISION)
        tl.store(U_out + v_base + t[:, None] * n_heads * dim_v + offs_v[None, :], u0,
                 mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _chunk_decays(G, b, h, t, offs_k, k_ok, padded_len, n_heads, dim_k, PER_KEY: tl.constexpr):
    """(c (C, BK|-), c_last (BK|scalar)) of the chunk of rows t: the cumulative log decay of its rows and of its
    last row."""
    last = tl.max(t, 0)  # the chunk's last (possibly padded) row
    if PER_KEY:
        base = G + (b * padded_len * n_heads + h) * dim_k
        g = tl.load(base + t[:, None] * n_heads * dim_k + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        g_last = tl.load(base + last * n_heads * dim_k + offs_k, mask=k_ok, other=0.0)
    else:
        g = tl.load(G + (b * padded_len + t) * n_heads + h)
        g_last = tl.load(G + (b * padded_len + last) * n_heads + h)
    return g, g_last


@triton.jit
def _fwd_h_kernel(
    K, G, W, U0, H0, Hs, VNEW, Ht,
    seqlen, padded_len, n_heads, dim_k, dim_v, n_chunks,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, PER_KEY: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (V tile, batch x head), sequential over chunks. Hs (B, H, NT, Dk, Dv) float32."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    state_mask = k_ok[:, None] & v_ok[None, :]
    state_off = offs_k[:, None] * dim_v + offs_v[None, :]
    bh = i_bh.to(tl.int64)
    state = tl.zeros([BK, BV], tl.float32)
    if USE_H0:
        state += tl.load(H0 + bh * dim_k * dim_v + state_off, mask=state_mask, other=0.0)
    k_base = K + (b * seqlen * n_heads + h) * dim_k
    w_base = W + (b * seqlen * n_heads + h) * dim_k
    v_base = (b * seqlen * n_heads + h) * dim_v
    for n in range(n_chunks):
        tl.store(Hs + (bh * n_chunks + n) * dim_k * dim_v + state_off, state, mask=state_mask)
        t = (n * C + offs_c).to(tl.int64)  # row offsets t * H * D can pass 2^31
        t_ok = t < seqlen
        w = _load_rows(w_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
        u = _load_rows(U0 + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
        u -= tl.dot(w, state, input_precision=PRECISION)
        tl.store(VNEW + v_base + t[:, None] * n_heads * dim_v + offs_v[None, :], u,
                 mask=t_ok[:, None] & v_ok[None, :])
        k = _load_rows(k_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
        if USE_G:
            g, g_last = _chunk_decays(G, b, h, t, offs_k, k_ok, padded_len, n_heads, dim_k, PER_KEY)
            if PER_KEY:
                k = k * tl.exp(g_last[None, :] - g)
                state = state * tl.exp(g_last)[:, None]
            else:
                k = k * tl.exp(g_last - g)[:, None]
                state = state * tl.exp(g_last)
        state += tl.dot(tl.trans(k), u, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(Ht + bh * dim_k * dim_v + state_off, state, mask=state_mask)


@triton.jit
def _fwd_o_kernel(
    Q, G, A, Hs, VNEW, O,  # noqa: E741
    seqlen, padded_len, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, PER_KEY: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (V tile, chunk, batch x head): O = scale (Q*gamma) H_n + A u."""
    i_v = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    bh = i_bh.to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    t = (n * C + offs_c).to(tl.int64)  # row offsets t * H * D can pass 2^31
    t_ok = t < seqlen
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    q = _load_rows(Q + (b * seqlen * n_heads + h) * dim_k, t, t_ok, offs_k, k_ok, n_heads * dim_k)
    if USE_G:
        g, g_last = _chunk_decays(G, b, h, t, offs_k, k_ok, padded_len, n_heads, dim_k, PER_KEY)
        q = q * tl.exp(g) if PER_KEY else q * tl.exp(g)[:, None]
    state = tl.load(Hs + (bh * n_chunks + n) * dim_k * dim_v + offs_k[:, None] * dim_v + offs_v[None, :],
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    attn = tl.load(A + (bh * n_chunks + n) * C * C + offs_c[:, None] * C + offs_c[None, :])
    v_base = (b * seqlen * n_heads + h) * dim_v
    u = _load_rows(VNEW + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
    o = scale * tl.dot(q, state, input_precision=PRECISION) + tl.dot(attn, u, input_precision=PRECISION)
    tl.store(O + v_base + t[:, None] * n_heads * dim_v + offs_v[None, :], o.to(O.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _bwd_dh_kernel(
    Q, K, G, A, W, DO, DHt, DHs, DU, DH0,
    seqlen, padded_len, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, PER_KEY: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (V tile, batch x head), reverse over chunks. DHs[n] = gradient of the state leaving
    chunk n; DU (like v) = gradient of the chunk's new values u."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    bh = i_bh.to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    state_mask = k_ok[:, None] & v_ok[None, :]
    state_off = offs_k[:, None] * dim_v + offs_v[None, :]
    dh = tl.zeros([BK, BV], tl.float32)
    if USE_DHT:
        dh += tl.load(DHt + bh * dim_k * dim_v + state_off, mask=state_mask, other=0.0)
    qk_base = (b * seqlen * n_heads + h) * dim_k
    v_base = (b * seqlen * n_heads + h) * dim_v
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        tl.store(DHs + (bh * n_chunks + n) * dim_k * dim_v + state_off, dh, mask=state_mask)
        t = (n * C + offs_c).to(tl.int64)  # row offsets t * H * D can pass 2^31
        t_ok = t < seqlen
        q = _load_rows(Q + qk_base, t, t_ok, offs_k, k_ok, n_heads * dim_k) * scale
        k = _load_rows(K + qk_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
        w = _load_rows(W + qk_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
        do = _load_rows(DO + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
        attn = tl.load(A + (bh * n_chunks + n) * C * C + offs_c[:, None] * C + offs_c[None, :])
        if USE_G:
            g, g_last = _chunk_decays(G, b, h, t, offs_k, k_ok, padded_len, n_heads, dim_k, PER_KEY)
            if PER_KEY:
                k = k * tl.exp(g_last[None, :] - g)
                q = q * tl.exp(g)
            else:
                k = k * tl.exp(g_last - g)[:, None]
                q = q * tl.exp(g)[:, None]
        du = tl.dot(tl.trans(attn), do, input_precision=PRECISION) + tl.dot(k, dh, input_precision=PRECISION)
        tl.store(DU + v_base + t[:, None] * n_heads * dim_v + offs_v[None, :], du,
                 mask=t_ok[:, None] & v_ok[None, :])
        if USE_G:
            dh = dh * (tl.exp(g_last)[:, None] if PER_KEY else tl.exp(g_last))
        dh += tl.dot(tl.trans(q), do, input_precision=PRECISION) - tl.dot(tl.trans(w), du, input_precision=PRECISION)
    if STORE_DH0:
        tl.store(DH0 + bh * dim_k * dim_v + state_off, dh, mask=state_mask)


@triton.jit
def _bwd_chunk_kernel(
    Q, K, V, BETA, G, T_in, Hs, DHs, VNEW, DU, DO, DQ, DK, DV, DBETA, DC,
    seqlen, padded_len, n_heads, dim_k, dim_v, n_chunks, scale,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, PER_KEY: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (chunk, batch x head); values in BV tiles. DQ, DK, DV, DBETA float32 like their inputs;
    DC like G (padded): the gradient of the chunk-local cumulative log decay."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = (i_bh // n_heads).to(tl.int64)
    h = i_bh % n_heads
    bh = i_bh.to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    t = (n * C + offs_c).to(tl.int64)  # row offsets t * H * D can pass 2^31
    t_ok = t < seqlen
    k_ok = offs_k < dim_k
    qk_base = (b * seqlen * n_heads + h) * dim_k
    v_base = (b * seqlen * n_heads + h) * dim_v
    q = _load_rows(Q + qk_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
    k = _load_rows(K + qk_base, t, t_ok, offs_k, k_ok, n_heads * dim_k)
    beta = tl.load(BETA + (b * seqlen + t) * n_heads + h, mask=t_ok, other=0.0).to(tl.float32)
    tri = tl.load(T_in + (bh * n_chunks + n) * C * C + offs_c[:, None] * C + offs_c[None, :])
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    state_base = (bh * n_chunks + n) * dim_k * dim_v

    acc_dq = tl.zeros([C, BK], tl.float32)  # dO H^T
    acc_dkd = tl.zeros([C, BK], tl.float32)  # u dH'^T
    acc_dw = tl.zeros([C, BK], tl.float32)  # -du H^T
    acc_da = tl.zeros([C, C], tl.float32)  # dO u^T
    acc_dt = tl.zeros([C, C], tl.float32)  # du (beta V)^T + dW (beta K*gamma)^T
    dbeta = tl.zeros([C], tl.float32)
    state_decay_grad = tl.zeros([BK], tl.float32)  # sum_v H * dH' per key row
    for v0 in range(0, dim_v, BV):
        offs_v = v0 + tl.arange(0, BV)
        v_ok = offs_v < dim_v
        do = _load_rows(DO + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
        u = _load_rows(VNEW + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
        du = _load_rows(DU + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
        v = _load_rows(V + v_base, t, t_ok, offs_v, v_ok, n_heads * dim_v)
        st_off = state_base + offs_k[:, None] * dim_v + offs_v[None, :]
        st_mask = k_ok[:, None] & v_ok[None, :]
        state = tl.load(Hs + st_off, mask=st_mask, other=0.0)
        dstate = tl.load(DHs + st_off, mask=st_mask, other=0.0)
        acc_dq += tl.dot(do, tl.trans(state), input_precision=PRECISION)
        acc_dkd += tl.dot(u, tl.trans(dstate), input_precision=PRECISION)
        acc_dw -= tl.dot(du, tl.trans(state), input_precision=PRECISION)
        acc_da += tl.dot(do, tl.trans(u), input_precision=PRECISION)
        acc_dt += tl.dot(du, tl.trans(v * beta[:, None]), input_precision=PRECISION)
        dx = tl.dot(tl.trans(tri), du, input_precision=PRECISION)  # d(beta V)
        tl.store(DV + v_base + t[:, None] * n_heads * dim_v + offs_v[None, :], dx * beta[:, None],
                 mask=t_ok[:, None] & v_ok[None, :])
        dbeta += tl.sum(dx * v, 1)
        state_decay_grad += tl.sum(state * dstate, 1)

    if USE_G:
        g, g_last = _chunk_decays(G, b, h, t, offs_k, k_ok, padded_len, n_heads, dim_k, PER_KEY)
        if PER_KEY:
            gamma = tl.exp(g)
            to_end = tl.exp(g_last[None, :] - g)
            chunk_decay = tl.exp(g_last)
        else:
            gamma = tl.exp(g)[:, None]
            to_end = tl.exp(g_last - g)[:, None]
            chunk_decay = tl.exp(g_last)
        k_gamma = k * gamma
        k_end = k * to_end
    else:
        k_gamma = k
        k_end = k
    # W = T (beta K*gamma)
    acc_dt += tl.dot(acc_dw, tl.trans(k_gamma * beta[:, None]), input_precision=PRECISION)
    dy = tl.dot(tl.trans(tri), acc_dw, input_precision=PRECISION)  # d(beta K*gamma)
    dbeta += tl.sum(dy * k_gamma, 1)
    d_k_gamma = dy * beta[:, None]
    # T = (I + M)^-1
    dm = -tl.dot(tl.dot(tl.trans(tri), acc_dt, input_precision=PRECISION), tl.trans(tri), input_precision=PRECISION)
    dm = tl.where(strict, dm, 0.0)
    da = tl.where(causal, acc_da, 0.0) * scale
    if USE_G and PER_KEY:
        pair = _pair_decay(g, causal)
        kk = tl.sum(k[:, None, :] * k[None, :, :] * pair, 2)
        dbeta += tl.sum(dm * kk, 1)
        weight_a = da[:, :, None] * pair
        weight_m = (dm * beta[:, None])[:, :, None] * pair
        dq_a = tl.sum(weight_a * k[None, :, :], 1)
        dk_a = tl.sum(weight_a * q[:, None, :], 0)
        dk_m_row = tl.sum(weight_m * k[None, :, :], 1)
        dk_m_col = tl.sum(weight_m * k[:, None, :], 0)
    else:
        if USE_G:
            pair = tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
        else:
            pair = tl.where(causal, 1.0, 0.0)
        kk = tl.dot(k, tl.trans(k), input_precision=PRECISION) * pair
        dbeta += tl.sum(dm * kk, 1)
        weight_a = da * pair
        weight_m = dm * beta[:, None] * pair
        dq_a = tl.dot(weight_a, k, input_precision=PRECISION)
        dk_a = tl.dot(tl.trans(weight_a), q, input_precision=PRECISION)
        dk_m_row = tl.dot(weight_m, k, input_precision=PRECISION)
        dk_m_col = tl.dot(tl.trans(weight_m), k, input_precision=PRECISION)
    if USE_G:
        dq = scale * gamma * acc_dq + dq_a
        dk = gamma * d_k_gamma + to_end * acc_dkd + dk_a + dk_m_row + dk_m_col
        # dL/dc, per key dimension: (decayed input) * (its gradient), signed by the exponent's sign
        end_terms = k_end * acc_dkd
        dc = q * dq + k_gamma * d_k_gamma - end_terms - k * dk_a + k * dk_m_row - k * dk_m_col
        last_row = tl.sum(end_terms, 0) + chunk_decay * state_decay_grad  # the chunk decay exp(c_C)
        dc += tl.where(offs_c[:, None] == C - 1, last_row[None, :], 0.0)
        if PER_KEY:
            tl.store(DC + (b * padded_len * n_heads + h) * dim_k + t[:, None] * n_heads * dim_k + offs_k[None, :],
                     dc, mask=k_ok[None, :])
        else:
            tl.store(DC + (b * padded_len + t) * n_heads + h, tl.sum(dc, 1))
    else:
        dq = scale * acc_dq + dq_a
        dk = d_k_gamma + acc_dkd + dk_a + dk_m_row + dk_m_col
    tl.store(DQ + qk_base + t[:, None] * n_heads * dim_k + offs_k[None, :], dq, mask=t_ok[:, None] & k_ok[None, :])
    tl.store(DK + qk_base + t[:, None] * n_heads * dim_k + offs_k[None, :], dk, mask=t_ok[:, None] & k_ok[None, :])
    tl.store(DBETA + (b * seqlen + t) * n_heads + h, dbeta, mask=t_ok)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------

INTERPRETED: bool = type(_fwd_h_kernel).__name__ == "InterpretedFunction"


def delta_rule_chunk_size(chunk_size: int, device: torch.device | None = None, *, per_key: bool = False) -> int:
    """The Triton chunk: a power of two in [16, 64] (tl.dot needs >= 16; the T solve is C row steps); on a GPU at
    most 32 (at C = 64, Dk = 128 the backward chunk kernel needs more than sm_90a's 227 KB of shared memory),
    and 16 for a per-key (KDA) gate (its pairwise weights are a (C, C, Dk) tile). Only rounding depends on it."""
    chunk = min(64, max(16, triton.next_power_of_2(int(chunk_size))))
    if device is not None and device.type == "cuda" and not INTERPRETED:
        chunk = 16 if per_key else min(chunk, 32)
    return chunk


def triton_delta_rule_supported(device: torch.device, dtype: torch.dtype, dim_k: int | None = None) -> bool:
    """CUDA (or CPU under TRITON_INTERPRET=1), fp16/bf16/fp32, Dk <= 256."""
    on_device = device.type == "cuda" or (device.type == "cpu" and INTERPRETED)
    return on_device and dtype in SUPPORTED_DTYPES and (dim_k is None or dim_k <= MAX_DIM_K)


def _tile(dim: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(dim)))


def kernel_flags(dim_k: int, dtype: torch.dtype, chunk: int, *, use_g: bool, per_key: bool) -> dict:
    """The constexprs every kernel here takes (bench/gpu_check.py --compile-only builds its variants from them)."""
    return {"C": chunk, "BK": _tile(dim_k, MAX_DIM_K), "USE_G": use_g, "PER_KEY": per_key,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _flags(q: torch.Tensor, gc: torch.Tensor | None, chunk: int) -> dict:
    return kernel_flags(q.shape[-1], q.dtype, chunk, use_g=gc is not None, per_key=gc is not None and gc.dim() == 4)


def value_tile(dim_v: int, device: torch.device) -> int:
    """BV: values are tiled (32 wide on a GPU, where the sequential kernels want more programs)."""
    return _tile(dim_v, 32 if (device.type == "cuda" and not INTERPRETED) else 64)


_GPU_LAUNCH = {
    # the sequential kernels: no software pipelining across chunks (with it, _bwd_dh_kernel at C = 64 needs
    # 279 KB of shared memory on sm_90a, over the 227 KB limit); the chunk kernels: 8 warps for their register-
    # heavy (C, C[, Dk]) tiles
    "_fwd_h_kernel": {"num_stages": 1},
    "_bwd_dh_kernel": {"num_stages": 1},
    "_prep_kernel": {"num_warps": 8},
    "_bwd_chunk_kernel": {"num_warps": 8, "num_stages": 1},
}


def launch_options(kernel_name: str, device: torch.device) -> dict:
    """num_warps / num_stages of a kernel on a GPU (bench/gpu_check.py --compile-only reports what they give)."""
    return dict(_GPU_LAUNCH.get(kernel_name, {})) if device.type == "cuda" and not INTERPRETED else {}


def _padded_chunk_cumsum(g: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunk-local cumulative sum of g (B, S, H[, Dk]), float32, padded to whole chunks with zeros in g (so the
    padded rows repeat the last cumulative value)."""
    b, s = g.shape[:2]
    rest = g.shape[2:]
    n_chunks = triton.cdiv(s, chunk)
    padded = torch.nn.functional.pad(g.float(), (0, 0) * len(rest) + (0, n_chunks * chunk - s))
    return padded.view(b, n_chunks, chunk, *rest).cumsum(2).view(b, n_chunks * chunk, *rest).contiguous()


def _forward_pieces(q, k, v, beta, gc, h0, scale, chunk, store_final):
    """(T, A, W, Hs, u, final state or None): everything the output and the backward read."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    n_chunks = triton.cdiv(s, chunk)
    flags = _flags(q, gc, chunk)
    bv = value_tile(dv, q.device)
    f32 = {"dtype": torch.float32, "device": q.device}
    tri = torch.empty(b, h, n_chunks, chunk, chunk, **f32)
    attn = torch.empty_like(tri)
    w = torch.empty(b, s, h, dk, **f32)
    u0 = torch.empty(b, s, h, dv, **f32)
    g_arg = gc if gc is not None else tri
    padded = n_chunks * chunk
    _prep_kernel[(n_chunks, b * h)](
        q, k, v, beta, g_arg, tri, attn, w, u0, s, padded, h, dk, dv, n_chunks, scale, BV=bv, **flags,
        **launch_options("_prep_kernel", q.device))
    hs = torch.empty(b, h, n_chunks, dk, dv, **f32)
    u = torch.empty_like(u0)
    final = torch.empty(b, h, dk, dv, **f32) if store_final else hs
    _fwd_h_kernel[(triton.cdiv(dv, bv), b * h)](
        k, g_arg, w, u0, h0 if h0 is not None else hs, hs, u, final, s, padded, h, dk, dv, n_chunks,
        BV=bv, USE_H0=h0 is not None, STORE_FINAL=store_final, **flags,
        **launch_options("_fwd_h_kernel", q.device))
    return tri, attn, w, hs, u, (final if store_final else None)


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """(q, k, v, beta, g or None, h0 or None) -> (o, final_state float32). g is the per-token log decay
    (B, S, H) or per key dimension (B, S, H, Dk); all tensors contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, chunk):
        b, s, h, dk = q.shape
        dv = v.shape[-1]
        gc = _padded_chunk_cumsum(g, chunk) if g is not None else None
        h0c = h0.float().contiguous() if h0 is not None else None
        tri, attn, w, hs, u, final = _forward_pieces(q, k, v, beta, gc, h0c, scale, chunk, store_final=True)
        o = torch.empty(b, s, h, dv, dtype=q.dtype, device=q.device)
        flags = _flags(q, gc, chunk)
        bv = value_tile(dv, q.device)
        n_chunks = tri.shape[2]
        _fwd_o_kernel[(triton.cdiv(dv, bv), n_chunks, b * h)](
            q, gc if gc is not None else tri, attn, hs, u, o, s, n_chunks * chunk, h, dk, dv, n_chunks, scale,
            BV=bv, **flags)
        ctx.save_for_backward(q, k, v, beta, gc, h0c)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, gc, h0c = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        b, s, h, dk = q.shape
        dv_dim = v.shape[-1]
        if do is None:
            do = torch.zeros(b, s, h, dv_dim, dtype=q.dtype, device=q.device)
        do = do.contiguous()
        dht_c = dht.float().contiguous() if dht is not None else None
        tri, attn, w, hs, u, _ = _forward_pieces(q, k, v, beta, gc, h0c, scale, chunk, store_final=False)
        n_chunks = tri.shape[2]
        padded = n_chunks * chunk
        flags = _flags(q, gc, chunk)
        bv = value_tile(dv_dim, q.device)
        g_arg = gc if gc is not None else tri
        dhs = torch.empty_like(hs)
        du = torch.empty_like(u)
        dh0 = torch.empty(b, h, dk, dv_dim, dtype=torch.float32, device=q.device) if h0c is not None else dhs
        _bwd_dh_kernel[(triton.cdiv(dv_dim, bv), b * h)](
            q, k, g_arg, attn, w, do, dht_c if dht_c is not None else dhs, dhs, du, dh0,
            s, padded, h, dk, dv_dim, n_chunks, scale,
            BV=bv, USE_DHT=dht_c is not None, STORE_DH0=h0c is not None, **flags,
            **launch_options("_bwd_dh_kernel", q.device))
        f32 = {"dtype": torch.float32, "device": q.device}
        dq = torch.empty(q.shape, **f32)
        dk_ = torch.empty(q.shape, **f32)
        dv = torch.empty(v.shape, **f32)
        dbeta = torch.empty(beta.shape, **f32)
        dc = torch.empty_like(gc) if gc is not None else dq
        _bwd_chunk_kernel[(n_chunks, b * h)](
            q, k, v, beta, g_arg, tri, hs, dhs, u, du, do, dq, dk_, dv, dbeta, dc,
            s, padded, h, dk, dv_dim, n_chunks, scale, BV=bv, **flags,
            **launch_options("_bwd_chunk_kernel", q.device))
        dg = None
        if gc is not None:  # c_t = sum of g over the chunk up to t: dg_j = sum_{t >= j in j's chunk} dc_t
            rest = gc.shape[2:]
            by_chunk = dc.view(b, n_chunks, chunk, *rest)
            dg = by_chunk.flip(2).cumsum(2).flip(2).reshape(b, padded, *rest)[:, :s]
        dh0_out = dh0.to(ctx.h0_dtype) if h0c is not None else None
        return (dq.to(q.dtype), dk_.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dg, dh0_out, None, None)


def triton_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule on the Triton kernels; the contract of
    ``seqpar.kernels.delta_rule.chunk_gated_delta_rule`` (call that with ``backend="triton"``; it validates).

    Shapes: q, k (B, S, H, Dk); v (B, S, H, Dv); beta (B, S, H); log_decay None, (B, S, H) (GDN) or
    (B, S, H, Dk) (KDA), <= 0; initial_state (B, H, Dk, Dv). Returns o (B, S, H, Dv) in q's dtype and the final
    state (B, H, Dk, Dv) float32 (None unless ``output_final_state``). Gradients flow to q, k, v, beta,
    log_decay and initial_state. ``chunk_size`` is rounded (``delta_rule_chunk_size``).

    Raises:
        ValueError: a dtype other than fp16/bf16/fp32, Dk > 256, or a device the kernels do not run on.
    """
    if not triton_delta_rule_supported(q.device, q.dtype, q.shape[-1]):
        raise ValueError(f"q: the triton delta rule needs CUDA (or CPU with TRITON_INTERPRET=1), a dtype in "
                         f"{SUPPORTED_DTYPES} and Dk <= {MAX_DIM_K}; got {q.device}, {q.dtype}, Dk={q.shape[-1]} "
                         "(use backend='torch')")
    b, s, h, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    per_key = log_decay is not None and log_decay.dim() == 4
    chunk = delta_rule_chunk_size(chunk_size, q.device, per_key=per_key)
    if s == 0:
        o = q.new_zeros(b, 0, h, v.shape[-1])
        final = (initial_state.float() if initial_state is not None
                 else q.new_zeros(b, h, dk, v.shape[-1], dtype=torch.float32))
        return o, (final if output_final_state else None)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = log_decay.float().contiguous() if log_decay is not None else None
    o, final = _ChunkGatedDeltaRule.apply(q, k, v, beta, g, initial_state, scale, chunk)
    return o, (final if output_final_state else None)


def kernel_for_backend(backend: str, q: torch.Tensor) -> Callable | None:
    """``chunk_gated_delta_rule``'s dispatch: "triton" -> the kernel; "auto" -> the kernel where it is the fast
    choice (compiled, on CUDA, a supported dtype and Dk), else None (torch).

    Raises:
        ValueError: naming ``backend``: "triton" on a device, dtype or Dk the kernels do not take.
    """
    supported = triton_delta_rule_supported(q.device, q.dtype, q.shape[-1])
    if backend == "auto":
        return triton_chunk_gated_delta_rule if supported and q.device.type == "cuda" and not INTERPRETED else None
    if not supported:
        raise ValueError(f"backend: the 'triton' delta rule cannot run on {q.device.type} with {q.dtype} and "
                         f"Dk={q.shape[-1]} (needs CUDA or TRITON_INTERPRET=1, one of {SUPPORTED_DTYPES}, Dk <= "
                         f"{MAX_DIM_K}); use backend='torch' or 'auto'")
    return triton_chunk_gated_delta_rule
