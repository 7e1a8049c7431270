"""Obviously-right references for tests: naive math, no tricks, run them in float64.

Nothing here is fast; everything here is written so that a reader can check it against the formula.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference_attention", "reference_gated_delta_rule", "reference_linear_attention"]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention by the definition; returns ``(out, lse)``.

    Shapes: q (B, Sq, H, D), k (B, Sk, H_kv, D), v (B, Sk, H_kv, Dv) -> out (B, Sq, H, Dv), lse (B, H, Sq);
    packed with ``cu_seqlens``: q/k/v (T, H, D) -> out (T, H, Dv), lse (H, T), tokens of different sequences
    never attend to each other. Masks compare positions (1-D, shared by the batch): key j is visible to query
    i when ``k_positions[j] <= q_positions[i]`` (causal) and ``-right <= q_positions[i] - k_positions[j] <=
    left`` (``window=(left, right)``, -1 = unbounded); by default positions are bottom-right aligned
    (``q_positions = arange(Sq) + Sk - Sq``), the flash-attn convention, which for Sq == Sk is the usual mask.
    ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before the mask. ``sinks`` (H,): one more
    logit per head in the softmax denominator, with a zero value (gpt-oss). Rows that see no key give out = 0
    and lse = -inf (lse = the sink logit with sinks).
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, lses = [], []
        for a, b in zip(bounds, bounds[1:]):
            o, seq_lse = reference_attention(
                q[None, a:b], k[None, a:b], v[None, a:b], causal=causal, scale=scale, window=window,
                softcap=softcap, sinks=sinks,
            )
            outs.append(o[0])
            lses.append(seq_lse[0])
        return torch.cat(outs, 0), torch.cat(lses, -1)
    _, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = h // h_kv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    qp = torch.arange(sq) + (sk - sq) if q_positions is None else q_positions.cpu()
    kp = torch.arange(sk) if k_positions is None else k_positions.cpu()
    distance = qp[:, None] - kp[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible &= distance >= 0
    if window is not None and window[0] >= 0:
        visible &= distance <= window[0]
    if window is not None and window[1] >= 0:
        visible &= distance >= -window[1]
    scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(scores, dim=-1)
    else:  # the sink as one more column of scores, whose value row is zero
        sink_column = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([scores, sink_column], -1), dim=-1)
    probs = torch.exp(scores - lse[..., None])
    # rows with no visible key: exp(-inf - -inf) is NaN, the answer is 0. Only those: NaN input stays NaN.
    probs = probs.masked_fill(torch.isneginf(lse)[..., None], 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def reference_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear-attention recurrence, one token at a time; returns ``(o, final_state)``.

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T,  o_t = scale * q_t^T S_t.

    With a GLA decay (B, S, H, Dk), exp(g_t) is a diagonal (Dk, Dk) factor: each key row of S decays by its own.

    Shapes: q, k (B, S, H, Dk); v (B, S, H, Dv); log_decay None, (H,), (B, S, H) or (B, S, H, Dk);
    initial_state (B, H, Dk, Dv); o (B, S, H, Dv); final_state (B, H, Dk, Dv).
    """
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    state = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state
    outs = []
    for t in range(s):
        if log_decay is None:
            decay = None
        elif log_decay.dim() == 1:
            decay = torch.exp(log_decay)[None, :, None, None]
        elif log_decay.dim() == 3:
            decay = torch.exp(log_decay[:, t])[:, :, None, None]
        else:  # GLA: row i of the (Dk, Dv) state is scaled by exp(g_t[i])
            decay = torch.exp(log_decay[:, t])[:, :, :, None]
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        state = kv + (state if decay is None else decay * state)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, dim=1), state


def reference_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, one token at a time; returns ``(o, final_state)``.

    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t,

    with the state S (Dk, Dv) (transformers' and fla's layout). exp(g_t) is one factor per head (Gated DeltaNet,
    log_decay (B, S, H)) or one per key row (Kimi Delta Attention, (B, S, H, Dk)); None: no decay (DeltaNet).

    Shapes: q, k (B, S, H, Dk); v (B, S, H, Dv); beta (B, S, H); initial_state (B, H, Dk, Dv);
    o (B, S, H, Dv); final_state (B, H, Dk, Dv).
    """
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    state = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state
    outs = []
    for t in range(s):
        if log_decay is not None:
            g = log_decay[:, t]
            state = state * torch.exp(g)[..., None, None] if g.dim() == 2 else state * torch.exp(g)[..., None]
        k_t, v_t, beta_t = k[:, t], v[:, t], beta[:, t, :, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)  # what the decayed state recalls for k_t
        state = state + k_t[..., :, None] * (beta_t * (v_t - predicted))[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, dim=1), state
