"""Chunked gated delta rule (Gated DeltaNet, Kimi Delta Attention) in torch, with the shard transition SP needs.

Convention (transformers' ``torch_chunk_gated_delta_rule`` and fla's): per head the state S is (Dk, Dv) and

    S_t = (I - beta_t k_t k_t^T) G_t S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t,

with G_t = exp(g_t) one factor per head and token (Gated DeltaNet, ``log_decay`` (B, S, H)), a diagonal of one
factor per key row (KDA, (B, S, H, Dk)), or I (DeltaNet, None). q/k normalisation (l2) is the caller's.

Chunked (WY / UT) form, chunk of C tokens entering with state S_0; c_t = the cumulative log decay inside the
chunk (a vector over Dk for KDA), gamma_t = exp(c_t), and [x, y]_ti = sum_d x_t[d] y_i[d] exp(c_t[d] - c_i[d]):

    u = U0 - W S_0                 the values the chunk writes ("new values"), with
    (I + M) U0 = beta V,  (I + M) W = beta (K * gamma),   M_ti = beta_t [k, k]_ti for i < t  (unit lower solve)
    O   = scale (Q * gamma) S_0 + A u,     A_ti = scale [q, k]_ti for i <= t
    S_C = gamma_C S_0 + (K * exp(c_C - c))^T u

so across chunks the state takes one (Dk, Dk) x (Dk, Dv) product; inside a chunk everything is batched. The
kernel runs as two passes: ``delta_rule_chunk_states`` (the solves and the recurrence: every chunk's S_0 and u,
the final state; no q) and ``delta_rule_chunk_outputs`` (O for all chunks at once), so SP can send the shard's
map after the first and compute the second while it travels.
Exponents are always differences c_t - c_i <= 0 (i <= t), never exp(-c): no overflow for strong decays. The
per-key (KDA) pairwise factor is a (C, C, Dk) tensor per chunk: memory S * C * Dk per head, so keep C small
there (``chunk_size`` 16-32 for long shards on CPU).

Across a shard the state map is affine: S_out = A_r S_in + B_r with A_r (Dk, Dk) per head, and every output
is affine in S_in: o_t = o_t(0) + W_t^T S_in. ``delta_rule_transition`` gets (o(0), W, A_r, B_r) from ONE
kernel call with the values widened by Dk zero columns and the initial state [0 | I] (the kernel is linear in
(V, S_0) jointly): the output's extra columns are W, the final state's are A_r. Backward is autograd through
the chunked form (exact; no recomputation, memory O(S (Dk + Dv)) per head for the saved activations).
"""

from __future__ import annotations

import math

import torch

__all__ = ["chunk_gated_delta_rule", "delta_rule_chunk_outputs", "delta_rule_chunk_states", "delta_rule_transition",
           "validate_delta_rule_inputs"]


def validate_delta_rule_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    *,
    check_values: bool = True,
) -> None:
    """Shapes, dtypes and devices of a delta-rule call (and, with ``check_values``, log_decay <= 0 and finite:
    one host sync).

    Raises:
        ValueError: naming the argument and what it must be.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name}: must be on q's device ({q.device}), got {t.device}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q, k: expected equal shapes (B, S, H, Dk), got q {tuple(q.shape)} and k {tuple(k.shape)} "
                         "(repeat k heads to the value heads first for grouped heads)")
    b, s, h, dk = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (b, s, h):
        raise ValueError(f"v: expected (B, S, H, Dv) = ({b}, {s}, {h}, Dv), got {tuple(v.shape)}")
    if tuple(beta.shape) != (b, s, h):
        raise ValueError(f"beta: expected (B, S, H) = {(b, s, h)} (one write strength per token and head), got "
                         f"{tuple(beta.shape)}")
    if log_decay is not None:
        if not isinstance(log_decay, torch.Tensor) or not log_decay.dtype.is_floating_point:
            raise ValueError("log_decay: expected None or a floating-point tensor")
        if tuple(log_decay.shape) not in ((b, s, h), (b, s, h, dk)):
            raise ValueError(f"log_decay: expected (B, S, H) = {(b, s, h)} (Gated DeltaNet) or (B, S, H, Dk) = "
                             f"{(b, s, h, dk)} (KDA), got {tuple(log_decay.shape)}")
        if log_decay.device != q.device:
            raise ValueError(f"log_decay: must be on q's device ({q.device}), got {log_decay.device}")
        if check_values:
            g = log_decay.detach()
            if bool(((g > 0) | ~torch.isfinite(g)).any()):
                raise ValueError("log_decay: must be finite and <= 0 (the log of a decay factor in (0, 1]); "
                                 "e.g. use -softplus(x)")
    if initial_state is not None:
        want = (b, h, dk, v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state: expected (B, H, Dk, Dv) = {want}, got "
                             f"{tuple(getattr(initial_state, 'shape', ()))}")


def _decayed_products(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor | None, *, strict: bool) -> torch.Tensor:
    """[x, y]_ti = sum_d x_t[d] y_i[d] exp(c_t[d] - c_i[d]) for i <= t (i < t when ``strict``), else 0.

    x, y (..., C, D); c None, (..., C) (one decay per token) or (..., C, D) (per key dimension) -> (..., C, C).
    """
    size = x.shape[-2]
    keep = torch.ones(size, size, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    if c is None:
        return (x @ y.mT).masked_fill(~keep, 0.0)
    if c.dim() == x.dim() - 1:
        diff = (c[..., :, None] - c[..., None, :]).masked_fill(~keep, float("-inf"))
        return (x @ y.mT) * diff.exp()
    diff = (c[..., :, None, :] - c[..., None, :, :]).masked_fill(~keep[..., None], float("-inf"))
    return torch.einsum("...td,...id,...tid->...ti", x, y, diff.exp())


def _triton_kernel(backend: str, q: torch.Tensor):
    """Backend dispatch: the Triton entry point when ``backend`` picks it ("triton"; "auto" on CUDA), else None
    (the torch chunked form). Raises ValueError naming ``backend``: unknown, or "triton" where it cannot run."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or (backend == "auto" and q.device.type != "cuda"):
        return None
    try:
        from seqpar.kernels.triton_delta_rule import kernel_for_backend
    except ImportError as exc:  # triton missing or broken: "auto" stays torch
        if backend == "auto":
            return None
        raise ValueError(f"backend: 'triton' needs triton ({type(exc).__name__}: {exc}); use 'torch'") from exc
    return kernel_for_backend(backend, q)


def chunk_gated_delta_rule(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over one (local) sequence, chunked; differentiable by autograd.

    Args:
        q, k: (B, S, H, Dk); v: (B, S, H, Dv); beta: (B, S, H) write strengths (usually in (0, 1)).
        log_decay: None, (B, S, H) (Gated DeltaNet) or (B, S, H, Dk) (KDA), <= 0 and finite.
        scale: default 1 / sqrt(Dk).
        initial_state: (B, H, Dk, Dv), the state before the first token (zeros by default).
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk (the sequence is padded with no-op tokens to a multiple).
        backend: "torch", "triton" (``seqpar.kernels.triton_delta_rule``; rounds ``chunk_size``) or "auto"
            (Triton on CUDA for fp16/bf16/fp32, else torch).

    Returns:
        ``(o, final_state)``: o (B, S, H, Dv) in q's dtype; final_state (B, H, Dk, Dv) in the compute dtype
        (float64 for float64 input, else float32), or None without ``output_final_state``.

    Raises:
        ValueError: shapes or dtypes that do not fit, log_decay > 0 or non-finite, ``chunk_size`` < 1, an
            unknown ``backend`` or "triton" where it cannot run.
    """
    validate_delta_rule_inputs(q, k, v, beta, log_decay, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an int >= 1, got {chunk_size!r}")
    triton_kernel = _triton_kernel(backend, q)
    if triton_kernel is not None:
        return triton_kernel(q, k, v, beta, log_decay=log_decay, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, chunk_size=chunk_size)
    cdt = _compute_dtype(q)  # q's dtype decides, as documented
    q_c, k_c, v_c, beta_c = (x.to(cdt) for x in (q, k, v, beta))
    states, u, final = delta_rule_chunk_states(k_c, v_c, beta_c, log_decay=log_decay, initial_state=initial_state,
                                               chunk_size=chunk_size)
    o = delta_rule_chunk_outputs(q_c, k_c, states, u, log_decay=log_decay, scale=scale, chunk_size=chunk_size)
    return o.to(q.dtype), final if output_final_state else None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunker(x: torch.Tensor, chunk_size: int):
    """(chunk length C, chunk count N, f) for a (B, S, H, ...) sequence: f(y) casts y (B, S, H, ...) to the compute
    dtype and reshapes it to (B, H, N, C, ...), padded with zeros (no-op tokens: k = 0, beta = 0, g = 0 leave
    the state as it is)."""
    b, s, h = x.shape[:3]
    size = min(chunk_size, s) if s > 0 else 1
    pad = (-s) % size
    n = (s + pad) // size
    cdt = _compute_dtype(x)

    def chunks(y: torch.Tensor) -> torch.Tensor:
        y = y.to(cdt).movedim(1, 2)
        if pad:
            y = torch.nn.functional.pad(y, (0, 0) * (y.dim() - 3) + (0, pad))
        return y.reshape(b, h, n, size, *y.shape[3:])

    return size, n, chunks


def delta_rule_chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state pass of ``chunk_gated_delta_rule`` (no queries): the WY/UT solves and the chunk-to-chunk
    recurrence. Inputs as ``chunk_gated_delta_rule`` (checked by the caller); differentiable by autograd.

    Returns ``(states, u, final)`` in the compute dtype: states (B, H, N, Dk, Dv) the state entering each of the N
    chunks, u (B, H, N, C, Dv) the values each chunk writes (u = U0 - W S_0), final (B, H, Dk, Dv). The output
    pass (``delta_rule_chunk_outputs``) needs only these, q, k and the decay: SP computes this pass first,
    starts the transfer of the final state's map and runs the output pass while it travels.
    """
    cdt = _compute_dtype(k)
    b, s, h, dk = k.shape
    dv = v.shape[-1]
    _, n, chunks = _chunker(k, chunk_size)
    per_key = log_decay is not None and log_decay.dim() == 4
    kc, vc, bc = chunks(k), chunks(v), chunks(beta)[..., None]
    c = None if log_decay is None else chunks(log_decay).cumsum(3)  # (B, H, N, C[, Dk])
    gamma = None if c is None else (c.exp() if per_key else c.exp()[..., None])
    k_gamma = kc if gamma is None else kc * gamma
    strict = _decayed_products(kc, kc, c, strict=True) * bc  # M: (B, H, N, C, C)
    u0 = torch.linalg.solve_triangular(strict, bc * vc, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(strict, bc * k_gamma, upper=False, unitriangular=True)
    if c is None:
        k_out, chunk_decay = kc, None
    else:
        last = c[..., -1:, :] if per_key else c[..., -1:]
        k_out = kc * ((last - c).exp() if per_key else (last - c).exp()[..., None])
        chunk_decay = c[..., -1, :, None].exp() if per_key else c[..., -1, None, None].exp()  # (B, H, N, Dk|1, 1)

    state = torch.zeros(b, h, dk, dv, dtype=cdt, device=k.device) if initial_state is None else initial_state.to(cdt)
    states, us = [], []
    for i in range(n):
        states.append(state)
        u = u0[:, :, i] - w[:, :, i] @ state
        us.append(u)
        decayed = state if chunk_decay is None else chunk_decay[:, :, i] * state
        state = decayed + k_out[:, :, i].mT @ u
    return torch.stack(states, 2), torch.stack(us, 2), state


def delta_rule_chunk_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    states: torch.Tensor,
    u: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The output pass of ``chunk_gated_delta_rule``: O = scale (Q * gamma) S_0 + A u per chunk, all chunks at
    once, from ``delta_rule_chunk_states``' (states, u) (same ``chunk_size``). Returns o (B, S, H, Dv) in the
    compute dtype; differentiable by autograd (also in ``states`` and ``u``)."""
    b, s, h, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    size, n, chunks = _chunker(q, chunk_size)
    per_key = log_decay is not None and log_decay.dim() == 4
    qc, kc = chunks(q), chunks(k)
    c = None if log_decay is None else chunks(log_decay).cumsum(3)
    attn = _decayed_products(qc, kc, c, strict=False) * scale  # (B, H, N, C, C)
    q_gamma = qc * scale if c is None else qc * (c.exp() if per_key else c.exp()[..., None]) * scale
    o = q_gamma @ states + attn @ u  # (B, H, N, C, Dv)
    return o.reshape(b, h, n * size, -1)[:, :, :s].movedim(1, 2)


def delta_rule_transition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One shard's delta rule as an affine function of the state entering it; differentiable by autograd.

    Returns ``(o0, w, a, m)`` in the compute dtype (float64 for float64 input, else float32):

    * o0 (B, S, H, Dv): the outputs with a zero entering state;
    * w (B, S, H, Dk): o_t = o0_t + w_t^T S_in for any entering state S_in (B, H, Dk, Dv);
    * a (B, H, Dk, Dk) and m (B, H, Dk, Dv): the state leaving the shard is a @ S_in + m.

    One ``chunk_gated_delta_rule`` call with the values widened by Dk zero columns and the initial state
    [0 | I]: the state map is linear in (values, entering state) together, so the extra columns carry the
    transition (cost: Dv + Dk value columns instead of Dv). ``backend`` as ``chunk_gated_delta_rule``.

    Raises:
        ValueError: as ``chunk_gated_delta_rule``.
    """
    validate_delta_rule_inputs(q, k, v, beta, log_decay, None)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    widened = torch.cat([v.to(cdt), v.new_zeros(b, s, h, dk, dtype=cdt)], -1)
    eye = torch.eye(dk, dtype=cdt, device=q.device).expand(b, h, dk, dk)
    start = torch.cat([torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device), eye], -1)
    out, final = chunk_gated_delta_rule(q.to(cdt), k.to(cdt), widened, beta.to(cdt), log_decay=log_decay,
                                        scale=scale, initial_state=start, output_final_state=True,
                                        chunk_size=chunk_size, backend=backend)
    return out[..., :dv], out[..., dv:], final[..., dv:], final[..., :dv]
