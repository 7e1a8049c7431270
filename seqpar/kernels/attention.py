"""The softmax-attention block kernel the SP algorithms call, behind a backend registry.

Contract (every backend):

* ``forward(q, k, v, *, causal, scale) -> (out, lse)``: q (B, Sq, H, D), k/v (B, Sk, H_kv, D) with
  H % H_kv == 0; out (B, Sq, H, D) in q's dtype; lse (B, H, Sq) in float32 (float64 for float64 input).
* ``backward(dout, q, k, v, out, lse, *, causal, scale) -> (dq, dk, dv)`` in the inputs' dtypes.
* ``causal`` is bottom-right aligned (flash-attn's convention): query i sees key j when j <= i + Sk - Sq.
  Rows that see no key give out = 0 and lse = -inf, never NaN.
* Packed variable-length forms take (T, H, D) tensors and int32 ``cu_seqlens_q`` / ``cu_seqlens_k`` and return
  lse of shape (H, T); sequence i of q attends only to sequence i of k. With ``max_seqlen_q``/``max_seqlen_k``
  (the longest sequence of each, computed once per step where the batch was packed) a varlen backend reads
  nothing of cu_seqlens on the host: no device sync per call. The caller vouches that the boundaries are valid.
* Options a backend may implement (``AttentionBackend.features``), passed only when used:
  ``window=(left, right)`` (flash-attn's ``window_size``, -1 = unbounded on that side): query i sees key j
  only when ``i - left <= j <= i + right`` in the bottom-right aligned positions (with ``causal`` also
  ``j <= i``); ``softcap``: scores s (after the scale) become ``softcap * tanh(s / softcap)`` (Gemma 2);
  ``q_positions``/``k_positions``: int64 (B, Sq) / (B, Sk) positions (packed: (Tq,) / (Tk,)) that the causal
  mask and the window compare instead of the bottom-right aligned ones (an SP block: the global positions of its
  rows within their sequence). v may have its own head dim Dv (MLA): out is (B, Sq, H, Dv).
* Any strides (a backend copies what its kernel cannot index, e.g. a head dim with stride != 1; it never reads
  outside a tensor). NaN in q, k or v gives NaN out (and lse, for q and k) in every row that sees it: a finite
  answer from NaN input would be silent corruption. (Rows that do not see it may turn NaN too: 0 * NaN.)
  tests/test_strided.py checks both for every backend.

The torch backend uses aten's fused CPU flash kernel (which returns the LSE) and falls back to plain math
elsewhere; Triton and flash-attn register themselves here when they import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from seqpar import tracing

__all__ = [
    "FEATURES",
    "AttentionBackend",
    "apply_attention_sinks",
    "attention",
    "attention_block",
    "attention_block_backward",
    "attention_block_varlen",
    "attention_block_varlen_backward",
    "attention_sinks_backward",
    "available_attention_backends",
    "call_features",
    "check_softcap",
    "check_window",
    "get_attention_backend",
    "merge_attention_outputs",
    "merge_attention_outputs_",
    "register_attention_backend",
]


@dataclass(frozen=True)
class AttentionBackend:
    """A set of attention kernels, named for its kernels (not for where they run).

    ``forward_varlen``/``backward_varlen`` may be None: the dispatcher then runs the padded kernels sequence by
    sequence; when given they take ``max_seqlen_q``/``max_seqlen_k`` keywords (int or None: see
    ``attention_block_varlen``). ``supports(device, dtype)``: where asking for it by name may run it.
    ``auto_eligible(device, dtype)``: where ``backend="auto"`` may pick it, i.e. where it is the fast choice
    (default: wherever it ``supports``); Triton supports CPU tensors under TRITON_INTERPRET=1 but is
    auto-eligible only on CUDA, since ``"auto"`` must not pick a numpy emulation.
    ``features``: which of ``FEATURES`` its kernels implement (``"window"``, ``"softcap"``, ``"positions"``: the
    keyword options ``window``, ``softcap``, ``q_positions``/``k_positions`` its forward/backward accept;
    ``"value_head_dim"``: v's head dim may differ from q/k's). A call that needs one resolves ``"auto"`` to a
    backend that has it and refuses a named backend that lacks it."""

    name: str
    forward: Callable
    backward: Callable
    supports: Callable[[torch.device, torch.dtype], bool]
    forward_varlen: Callable | None = None
    backward_varlen: Callable | None = None
    auto_eligible: Callable[[torch.device, torch.dtype], bool] | None = None
    features: frozenset[str] = frozenset()


FEATURES = ("window", "softcap", "positions", "value_head_dim")
_BACKENDS: dict[str, AttentionBackend] = {}
_AUTO_ORDER = ("flash_attn", "triton", "torch")
# Names that once meant "these kernels, somewhere else": a backend is named for its kernels only.
_RETIRED_NAMES = {"triton_interpret": "triton"}


def check_retired_backend_name(name: str) -> None:
    """Raise ValueError (naming ``backend``) for a backend name that was replaced; shared with linear attention.

    Raises:
        ValueError: ``name`` is a retired name such as ``"triton_interpret"``.
    """
    if name in _RETIRED_NAMES:
        new = _RETIRED_NAMES[name]
        raise ValueError(
            f"backend: {name!r} was removed; use backend={new!r}, which runs the same kernels on CUDA and, "
            "under TRITON_INTERPRET=1, on CPU"
        )


def register_attention_backend(backend: AttentionBackend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def available_attention_backends() -> list[str]:
    return list(_BACKENDS)


def get_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, *, needs: tuple[str, ...] = ()
) -> AttentionBackend:
    """Resolve ``name`` (``"auto"`` or a registered name) for tensors on ``device`` of ``dtype`` and a call
    that uses the ``needs`` of ``FEATURES``.

    ``"auto"`` is the first of ``_AUTO_ORDER`` (flash_attn, triton, torch) that is ``auto_eligible`` here and
    has every needed feature.

    Raises:
        ValueError: unknown or retired backend name, or a named backend that cannot run on this device/dtype or
            lacks a needed feature.
    """
    return resolve_backend(_BACKENDS, _AUTO_ORDER, name, device, dtype, kind="attention", needs=needs)


def call_features(
    q: torch.Tensor, v: torch.Tensor, *, window: tuple[int, int] | None = None, softcap: float | None = None,
    positions: bool = False,
) -> tuple[str, ...]:
    """The ``FEATURES`` a call with these tensors and options needs of its backend."""
    return tuple(name for name, used in (
        ("window", window is not None), ("softcap", softcap is not None), ("positions", positions),
        ("value_head_dim", v.shape[-1] != q.shape[-1]),
    ) if used)


def check_window(window: object) -> tuple[int, int] | None:
    """``window`` as the kernels take it: None, or (left, right) ints >= -1 with -1 meaning unbounded; (-1, -1)
    is no window (None).

    Raises:
        ValueError: naming ``window``, for anything else.
    """
    if window is None:
        return None
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window
    )
    if not ok:
        raise ValueError(
            f"window: expected None or (left, right) ints >= -1 (-1: unbounded on that side), got {window!r}; "
            "a sliding window of W tokens with causal=True is (W - 1, 0)"
        )
    left, right = int(window[0]), int(window[1])
    return None if (left, right) == (-1, -1) else (left, right)


def check_softcap(softcap: object) -> float | None:
    """``softcap`` as the kernels take it: None (or 0.0, flash-attn's "off") or a finite float > 0.

    Raises:
        ValueError: naming ``softcap``, for anything else.
    """
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected None or a finite number > 0 (0 means off), got {softcap!r}")
    return None if softcap == 0 else float(softcap)


def check_sinks(sinks: object, heads: int, q: torch.Tensor) -> None:
    """Raise ValueError (naming ``sinks``) unless it is None or a floating-point (H,) tensor on q's device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point or tuple(sinks.shape) != (heads,):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks: expected a floating-point tensor of shape ({heads},) (one logit per query head), "
                         f"got {got}")
    if sinks.device != q.device:
        raise ValueError(f"sinks: must be on q's device ({q.device}); got {sinks.device}")


def resolve_backend(
    backends: dict, auto_order: tuple[str, ...], name: str, device: torch.device, dtype: torch.dtype, *,
    kind: str, subject: str = "", needs: tuple[str, ...] = (),
):
    """The one resolution rule of every kernel registry (attention, linear attention): ``"auto"`` is the first of
    ``auto_order`` that is ``auto_eligible`` (else ``supports``) for ``device``/``dtype``; a name is that backend,
    if it ``supports`` them. ``kind`` and ``subject`` word the errors ("unknown {kind} backend", "'x'{subject}
    cannot run on ..."). ``needs``: features (``backend.features``) the call uses.

    Raises:
        ValueError: naming ``backend``: a retired or unknown name, no eligible backend, or one that cannot run here
            or lacks a needed feature.
    """
    check_retired_backend_name(name)
    has_needs = lambda b: set(needs) <= set(getattr(b, "features", ()))  # noqa: E731
    if name == "auto":
        for candidate in auto_order:
            backend = backends.get(candidate)
            eligible = backend is not None and (backend.auto_eligible or backend.supports)(device, dtype)
            if eligible and has_needs(backend):
                return backend
        wanted = f" with {', '.join(needs)}" if needs else ""
        raise ValueError(f"backend: no {kind} backend supports {device.type}/{dtype}{wanted}")
    if name not in backends:
        raise ValueError(f"backend: unknown {kind} backend {name!r}; registered: {sorted(backends)} or 'auto'")
    backend = backends[name]
    if not backend.supports(device, dtype):
        requirement = getattr(backend, "needs", None)
        requirement = f" (needs {requirement})" if requirement else ""
        raise ValueError(
            f"backend: {name!r}{subject} cannot run on {device.type} with {dtype}{requirement}; use backend='auto'"
        )
    if not has_needs(backend):
        missing = sorted(set(needs) - set(getattr(backend, "features", ())))
        able = sorted(n for n, b in backends.items() if has_needs(b) and b.supports(device, dtype))
        raise ValueError(
            f"backend: {name!r}{subject} cannot do {', '.join(missing)}; use backend='auto' (or one of {able})"
        )
    return backend


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial results and LSEs are kept in float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------------
# The out/LSE merge
# ----------------------------------------------------------------------------------------------------


def merge_attention_outputs(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-attention partials over disjoint key sets; -inf safe, in float32 (float64 for float64).

    out: (..., S, H, D) with lse (..., H, S) -- the kernels' layout. ``out=None`` starts from ``block_*``.
    """
    acc = accumulation_dtype(block_out.dtype)
    block_out, block_lse = block_out.to(acc), block_lse.to(acc)
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    # Where both are -inf the row has seen no key yet: keep zeros instead of exp(nan).
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - safe).transpose(-1, -2).unsqueeze(-1)
    w_new = torch.exp(block_lse - safe).transpose(-1, -2).unsqueeze(-1)
    return out * w_old + block_out * w_new, new_lse


def merge_attention_outputs_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_attention_outputs`` into the caller's accumulators ``out``/``lse`` (float32, or float64 for float64
    input) in place; returns them. One pass over ``out`` (``lerp_`` towards the block by its share of the new
    normaliser) and no temporaries of its size, where the out-of-place merge makes three."""
    block_out, block_lse = block_out.to(out.dtype), block_lse.to(lse.dtype)
    new_lse = torch.logaddexp(lse, block_lse)
    # Where both are -inf the row has seen no key yet: weight 0 keeps its zeros instead of exp(nan).
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    out.lerp_(block_out, torch.exp(block_lse - safe).transpose(-1, -2).unsqueeze(-1))
    lse.copy_(new_lse)
    return out, lse


def apply_attention_sinks(
    out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add per-head sink logits (gpt-oss ``s_aux``) to the softmax denominator of a FINAL merged (out, lse):
    ``lse' = logaddexp(lse, sink_h)``, ``out' = out * exp(lse - lse')``. A sink is a key with logit sink_h and a
    zero value; it takes probability mass and gives nothing back.

    out (..., S, H, Dv), lse (..., H, S), sinks (H,) -> (out', lse') in the accumulation dtype. Not
    differentiable by itself: the ops' autograd uses ``attention_sinks_backward``.
    """
    acc = accumulation_dtype(out.dtype)
    out, lse = out.to(acc), lse.to(acc)
    new_lse = torch.logaddexp(lse, sinks.to(acc)[:, None])
    return out * torch.exp(lse - new_lse).transpose(-1, -2).unsqueeze(-1), new_lse


def attention_sinks_backward(
    dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> torch.Tensor:
    """Gradient of the loss in the sink logits, (H,) in sinks' dtype, from this caller's rows: ``out``/``lse``
    are the FINAL ones (after ``apply_attention_sinks``). The sink's probability is p = exp(sink_h - lse') and
    its value is zero, so d sink_h = -sum over rows of p * (dout . out'). The blocks' own backward with the
    final out/lse already gives dq, dk, dv. Shapes as ``apply_attention_sinks``."""
    acc = accumulation_dtype(out.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(-1, -2)  # (..., H, S)
    probability = torch.exp(sinks.to(acc)[:, None] - lse.to(acc))
    grad = -(probability * delta)
    return grad.reshape(-1, *grad.shape[-2:]).sum((0, 2)).to(sinks.dtype)


# ----------------------------------------------------------------------------------------------------
# Torch backend
# ----------------------------------------------------------------------------------------------------


def _causal_bias(sq: int, sk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill(j > i + (sk - sq), float("-inf"))


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """softmax probabilities exp(scores - lse); 0 in rows that see no key (lse = -inf, where the subtraction
    gives NaN). Not nan_to_num: a NaN that comes from NaN input must reach the output."""
    return torch.exp(scores - lse[..., None]).masked_fill(torch.isneginf(lse)[..., None], 0.0)


def _math_forward(q, k, v, causal, scale):
    """Plain softmax in the accumulation dtype: (B, H, Sq, D) in, (out, lse) out. For devices without a fused kernel."""
    acc = accumulation_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, 1).to(acc)
    vv = v.repeat_interleave(group, 1).to(acc)
    scores = q.to(acc) @ kk.transpose(-1, -2) * scale
    if causal:
        scores = scores + _causal_bias(q.shape[2], k.shape[2], acc, q.device)
    lse = torch.logsumexp(scores, -1)
    return (_probabilities(scores, lse) @ vv).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    acc = accumulation_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    qa, doa, oa = q.to(acc), dout.to(acc), out.to(acc)
    kk = k.repeat_interleave(group, 1).to(acc)
    vv = v.repeat_interleave(group, 1).to(acc)
    scores = qa @ kk.transpose(-1, -2) * scale
    if causal:
        scores = scores + _causal_bias(q.shape[2], k.shape[2], acc, q.device)
    probs = _probabilities(scores, lse.to(acc))
    dv = probs.transpose(-1, -2) @ doa
    dp = doa @ vv.transpose(-1, -2)
    delta = (doa * oa).sum(-1, keepdim=True)
    ds = probs * (dp - delta) * scale
    dq = ds @ kk
    dk = ds.transpose(-1, -2) @ qa
    b, h_kv, sk, _ = k.shape
    dk = dk.view(b, h_kv, group, sk, -1).sum(2)
    dv = dv.view(b, h_kv, group, sk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _visible(
    sq: int, sk: int, causal: bool, window: tuple[int, int] | None, q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None, device: torch.device,
) -> torch.Tensor | None:
    """(B or 1, 1, Sq, Sk) bool: which keys each query sees (None: all). Positions default to bottom-right
    alignment (query i at i + Sk - Sq, key j at j)."""
    if not causal and window is None:
        return None
    qp = torch.arange(sq, device=device)[None] + (sk - sq) if q_positions is None else q_positions.long()
    kp = torch.arange(sk, device=device)[None] if k_positions is None else k_positions.long()
    distance = qp[:, :, None] - kp[:, None, :]  # i - j
    visible = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= distance <= left
        if right >= 0:
            visible &= distance >= -right
    return visible[:, None]


def _general_scores(q, k, causal, scale, window, softcap, q_positions, k_positions):
    """(B, H, Sq, Sk) scores in the accumulation dtype after the softcap and the mask, and tanh of the softcap
    (None without one). q (B, Sq, H, D), k (B, Sk, H, D) already expanded to q's heads."""
    acc = accumulation_dtype(q.dtype)
    scores = q.transpose(1, 2).to(acc) @ k.transpose(1, 2).to(acc).transpose(-1, -2) * scale
    capped = None
    if softcap is not None:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    visible = _visible(q.shape[1], k.shape[1], causal, window, q_positions, k_positions, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores, capped


_GENERAL_CHUNK_SCORES = 1 << 24  # scores per query-row chunk of the math path (64 MiB in float32): bounds its memory


def _row_chunks(q, k, q_positions, k_positions):
    """[(rows slice, q_positions, k_positions)]: query-row chunks of at most ``_GENERAL_CHUNK_SCORES`` scores, with
    the positions made explicit when there is more than one (the bottom-right default is per block)."""
    b, sq, h = q.shape[:3]
    sk = k.shape[1]
    rows = max(1, _GENERAL_CHUNK_SCORES // max(1, b * h * sk))
    if rows >= sq:
        return [(slice(0, sq), q_positions, k_positions)]
    if q_positions is None:
        q_positions = torch.arange(sq, device=q.device)[None] + (sk - sq)
        k_positions = torch.arange(sk, device=q.device)[None]
    return [(slice(a, min(a + rows, sq)), q_positions[:, a:a + rows], k_positions) for a in range(0, sq, rows)]


def _general_forward(q, k, v, *, causal, scale, window, softcap, q_positions, k_positions):
    """Any window, softcap, positions and value head dim, by plain math over the (Sq, Sk) score matrix, in
    query-row chunks: (B, S, H, D) in, (out, lse) out. What the torch backend runs for the options aten's
    kernel lacks."""
    acc = accumulation_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2).to(acc).transpose(1, 2)
    outs, lses = [], []
    for rows, qp, kp in _row_chunks(q, k, q_positions, k_positions):
        scores, _ = _general_scores(q[:, rows], kk, causal, scale, window, softcap, qp, kp)
        lse = torch.logsumexp(scores, -1)
        outs.append((_probabilities(scores, lse) @ vv).transpose(1, 2).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, -1)


def _general_backward(dout, q, k, v, out, lse, *, causal, scale, window, softcap, q_positions, k_positions):
    acc = accumulation_dtype(q.dtype)
    b, sk, h_kv = k.shape[:3]
    group = q.shape[2] // h_kv
    t = lambda x: x.transpose(1, 2).to(acc)  # noqa: E731 -- (B, S, H, D) -> (B, H, S, D)
    kk = k.repeat_interleave(group, 2)
    k_acc, v_acc = t(kk), t(v.repeat_interleave(group, 2))
    dq = torch.empty_like(q)
    dk = torch.zeros(k_acc.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v_acc.shape, dtype=acc, device=q.device)
    for rows, qp, kp in _row_chunks(q, k, q_positions, k_positions):
        scores, capped = _general_scores(q[:, rows], kk, causal, scale, window, softcap, qp, kp)
        probs = _probabilities(scores, lse[..., rows].to(acc))
        doa, oa = t(dout[:, rows]), t(out[:, rows])
        dv += probs.transpose(-1, -2) @ doa
        ds = probs * (doa @ v_acc.transpose(-1, -2) - (doa * oa).sum(-1, keepdim=True))
        if capped is not None:  # d(c tanh(s / c)) / ds = 1 - tanh^2
            ds = ds * (1 - capped * capped)
        ds = ds * scale
        dq[:, rows] = (ds @ k_acc).transpose(1, 2).to(q.dtype)
        dk += ds.transpose(-1, -2) @ t(q[:, rows])
    dk = dk.view(b, h_kv, group, sk, -1).sum(2)
    dv = dv.view(b, h_kv, group, sk, -1).sum(2)
    return dq, dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


def _use_cpu_flash(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _unit_stride_head_dim(*ts: torch.Tensor) -> list[torch.Tensor]:
    """The tensors with a unit-stride head dim (copied only where needed): aten's CPU flash kernel indexes the
    head dim without its stride, so x[..., ::2] or a (B, S, D, H).transpose(-1, -2) view would be read out of
    bounds. Every other stride it honours, so the (B, S, H, D) -> (B, H, S, D) transposes stay views."""
    return [t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in ts]


def _pad_head_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def _torch_forward_bhsd(q, k, v, causal, scale):
    """(B, H, S, D) tensors, every query row sees at least one key."""
    if not _use_cpu_flash(q):
        return _math_forward(q, k, v, causal, scale)
    if v.shape[-1] != q.shape[-1]:  # aten's kernel wants one head dim: zero columns change no score, no output
        d, dv = q.shape[-1], v.shape[-1]
        width = max(d, dv)
        out, lse = _torch_forward_bhsd(_pad_head_dim(q, width), _pad_head_dim(k, width), _pad_head_dim(v, width),
                                       causal, scale)[:2]
        return out[..., :dv], lse
    q, k, v = _unit_stride_head_dim(q, k, v)
    sq, sk = q.shape[2], k.shape[2]
    if causal and sq != sk:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=_causal_bias(sq, sk, q.dtype, q.device), scale=scale
        )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _torch_backward_bhsd(dout, q, k, v, out, lse, causal, scale):
    if not _use_cpu_flash(q):
        return _math_backward(dout, q, k, v, out, lse, causal, scale)
    if v.shape[-1] != q.shape[-1]:
        d, dv = q.shape[-1], v.shape[-1]
        width = max(d, dv)
        pad = lambda x: _pad_head_dim(x, width).contiguous()  # noqa: E731
        g_q, g_k, g_v = _torch_backward_bhsd(pad(dout), pad(q), pad(k), pad(v), pad(out), lse, causal, scale)
        return g_q[..., :d], g_k[..., :d], g_v[..., :dv]
    sq, sk = q.shape[2], k.shape[2]
    mask = _causal_bias(sq, sk, q.dtype, q.device) if causal and sq != sk else None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal and mask is None, attn_mask=mask, scale=scale
    )


def _window_hides_nothing(window: tuple[int, int] | None, sq: int, sk: int, causal: bool) -> bool:
    """Whether ``window`` masks no key of a bottom-right aligned (Sq, Sk) block (distances i - j lie in
    [1 - Sq, Sk - 1]; causal already hides the negative ones): then aten's fast kernel runs it as it is."""
    if window is None:
        return True
    left, right = window
    return (left < 0 or left >= sk - 1) and (causal or right < 0 or right >= sq - 1)


def _torch_forward(q, k, v, *, causal, scale, window=None, softcap=None, q_positions=None, k_positions=None):
    if q_positions is None and _window_hides_nothing(window, q.shape[1], k.shape[1], causal):
        window = None
    if window is not None or softcap is not None or q_positions is not None or k_positions is not None:
        return _general_forward(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                q_positions=q_positions, k_positions=k_positions)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    # With bottom-right causal alignment the first Sq - Sk rows see no key: they stay at (0, -inf).
    first = max(sq - sk, 0) if causal else 0
    if sk == 0 or first == sq:
        return q.new_zeros(b, sq, h, v.shape[-1]), torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
    q_rows = q[:, first:]
    o, rows_lse = _torch_forward_bhsd(q_rows.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale)
    o, rows_lse = o.transpose(1, 2), rows_lse.to(acc)
    # aten's CPU kernel returns out 0, lse 0 for a query row holding NaN (a silent finite answer); the softmax of
    # NaN scores is NaN: put it back. (NaN in k or v does reach its output.) A row's sum is NaN when it holds a
    # NaN (or both infinities, whose scores are NaN too): one reduction over q, cheaper than isnan(q).any(-1);
    # in place on the kernel's fresh tensors, so no copy and no host read.
    nan_rows = torch.isnan(q_rows.sum(-1))  # (B, Sq - first, H)
    o.masked_fill_(nan_rows[..., None], float("nan"))
    rows_lse.masked_fill_(nan_rows.transpose(1, 2), float("nan"))
    if first == 0:  # the common case: the kernel's own tensors, no copy
        return o, rows_lse
    out = q.new_zeros(b, sq, h, v.shape[-1])
    lse = torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
    out[:, first:], lse[:, :, first:] = o, rows_lse
    return out, lse


def _torch_backward(
    dout, q, k, v, out, lse, *, causal, scale, window=None, softcap=None, q_positions=None, k_positions=None
):
    if q_positions is None and _window_hides_nothing(window, q.shape[1], k.shape[1], causal):
        window = None
    if window is not None or softcap is not None or q_positions is not None or k_positions is not None:
        return _general_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, window=window, softcap=softcap,
                                 q_positions=q_positions, k_positions=k_positions)
    sq, sk = q.shape[1], k.shape[1]
    first = max(sq - sk, 0) if causal else 0
    if sk == 0 or first == sq:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    t = lambda x: x.transpose(1, 2)  # noqa: E731 -- (B, S, H, D) <-> (B, H, S, D)
    lse_rows = lse[:, :, first:]
    if _use_cpu_flash(q):
        # aten's CPU flash backward honours every stride but the head dim's (lse's too, e.g. the (B, S, H) layout
        # its forward returns it in): views, no copies of the operands or of lse (the copy was alive at the peak)
        lse_rows = lse_rows.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        operands = _unit_stride_head_dim(dout[:, first:], q[:, first:], k, v, out[:, first:])
    else:
        operands = [x.contiguous() for x in (dout[:, first:], q[:, first:], k, v, out[:, first:])]
    g_q, g_k, g_v = _torch_backward_bhsd(*(t(x) for x in operands), lse_rows, causal, scale)
    g_q, g_k, g_v = t(g_q), t(g_k), t(g_v)
    if first:
        dq = torch.zeros_like(q)
        dq[:, first:] = g_q
        g_q = dq
    return g_q, g_k, g_v


register_attention_backend(
    AttentionBackend(
        name="torch",
        forward=_torch_forward,
        backward=_torch_backward,
        supports=lambda device, dtype: dtype.is_floating_point,
        features=frozenset(FEATURES),
    )
)


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------


def _options(
    window: tuple[int, int] | None, softcap: float | None, q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None,
) -> dict:
    """The optional keyword options a call passes to its backend: only those in use, so that backends without
    the features keep their old signature."""
    if (q_positions is None) != (k_positions is None):
        raise ValueError("k_positions: pass both q_positions and k_positions, or neither")
    options = {"window": check_window(window), "softcap": check_softcap(softcap), "q_positions": q_positions,
               "k_positions": k_positions}
    return {name: value for name, value in options.items() if value is not None}


def _resolve(backend: str, q: torch.Tensor, v: torch.Tensor, options: dict) -> AttentionBackend:
    needs = call_features(q, v, window=options.get("window"), softcap=options.get("softcap"),
                          positions="q_positions" in options)
    return get_attention_backend(backend, q.device, q.dtype, needs=needs)


def attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against one block of keys; returns ``(out, lse)``. See the module docstring for shapes and
    the options (``window``, ``softcap``, ``q_positions``/``k_positions`` (B, Sq) / (B, Sk)).

    Raises:
        ValueError: a bad ``window``/``softcap``, one position tensor without the other, or a backend that
            cannot run here or lacks an option used.
    """
    options = _options(window, softcap, q_positions, k_positions)
    impl = _resolve(backend, q, v, options)
    tracing.record("kernel", name="attention_block", causal=causal, sq=q.shape[1], sk=k.shape[1])
    return impl.forward(q, k, v, causal=causal, scale=_default_scale(q, scale), **options)


def attention_block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_block``. ``out``/``lse`` are the FINAL (merged) ones when the block is part of a
    larger softmax: then ``dq`` etc. are this block's share of the gradient."""
    options = _options(window, softcap, q_positions, k_positions)
    impl = _resolve(backend, q, v, options)
    tracing.record("kernel", name="attention_block_backward", causal=causal, sq=q.shape[1], sk=k.shape[1])
    return impl.backward(dout, q, k, v, out, lse, causal=causal, scale=_default_scale(q, scale), **options)


def _sequence_options(options: dict, qa: int, qb: int, ka: int, kb: int) -> dict:
    """The options of one packed sequence: its slice of the position tensors, as a batch of one."""
    if "q_positions" not in options:
        return options
    return {**options, "q_positions": options["q_positions"][None, qa:qb],
            "k_positions": options["k_positions"][None, ka:kb]}


def _batched_options(options: dict, n: int, sq: int, sk: int) -> dict:
    if "q_positions" not in options:
        return options
    return {**options, "q_positions": options["q_positions"].reshape(n, sq),
            "k_positions": options["k_positions"].reshape(n, sk)}


def attention_block_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed form: q (Tq, H, D), k (Tk, H_kv, D), v (Tk, H_kv, Dv) -> out (Tq, H, Dv), lse (H, Tq).

    ``max_seqlen_q``/``max_seqlen_k``: the longest sequence of ``cu_seqlens_q``/``cu_seqlens_k``, both or
    neither. Given, a varlen backend (Triton, flash-attn) neither validates nor reads the boundaries on the host
    (they were validated once per step, where the batch was packed); None: it reads and validates them. The
    torch backend reads them either way (it runs sequence by sequence). ``window``, ``softcap``: as
    ``attention_block``; ``q_positions``/``k_positions``: (Tq,) / (Tk,) positions within each token's sequence.

    Raises:
        ValueError: only one of the hints given; as ``attention_block``; what the backend raises for bad shapes
            or cu_seqlens.
    """
    options = _options(window, softcap, q_positions, k_positions)
    impl = _resolve(backend, q, v, options)
    scale = _default_scale(q, scale)
    _check_hints(max_seqlen_q, max_seqlen_k)
    tracing.record("kernel", name="attention_block_varlen", causal=causal, sq=q.shape[0], sk=k.shape[0])
    if impl.forward_varlen is not None:
        return impl.forward_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, **options,
        )
    batched = _as_batch(cu_seqlens_q, cu_seqlens_k, (q.shape[0], k.shape[0]), (max_seqlen_q, max_seqlen_k))
    if batched is not None:  # equal lengths: one padded call instead of a loop
        n, sq, sk = batched
        out, lse = impl.forward(
            q.view(n, sq, *q.shape[1:]), k.view(n, sk, *k.shape[1:]), v.view(n, sk, *v.shape[1:]),
            causal=causal, scale=scale, **_batched_options(options, n, sq, sk),
        )
        return out.reshape(q.shape[0], *out.shape[2:]), lse.transpose(0, 1).reshape(lse.shape[1], -1)
    outs, lses = [], []
    for (qa, qb), (ka, kb) in _pairs(cu_seqlens_q, cu_seqlens_k):
        o, seq_lse = impl.forward(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal, scale=scale,
                                  **_sequence_options(options, qa, qb, ka, kb))
        outs.append(o[0])
        lses.append(seq_lse[0])
    return torch.cat(outs), torch.cat(lses, -1)


def attention_block_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_block_varlen`` (the same hints, options and errors)."""
    options = _options(window, softcap, q_positions, k_positions)
    impl = _resolve(backend, q, v, options)
    scale = _default_scale(q, scale)
    _check_hints(max_seqlen_q, max_seqlen_k)
    tracing.record("kernel", name="attention_block_varlen_backward", causal=causal, sq=q.shape[0], sk=k.shape[0])
    if impl.backward_varlen is not None:
        return impl.backward_varlen(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **options,
        )
    batched = _as_batch(cu_seqlens_q, cu_seqlens_k, (q.shape[0], k.shape[0]), (max_seqlen_q, max_seqlen_k))
    if batched is not None:
        n, sq, sk = batched
        as_q = lambda x: x.reshape(n, sq, *x.shape[1:])  # noqa: E731
        as_k = lambda x: x.reshape(n, sk, *x.shape[1:])  # noqa: E731
        g = impl.backward(
            as_q(dout), as_q(q), as_k(k), as_k(v), as_q(out), lse.reshape(lse.shape[0], n, sq).transpose(0, 1),
            causal=causal, scale=scale, **_batched_options(options, n, sq, sk),
        )
        return g[0].reshape(q.shape), g[1].reshape(k.shape), g[2].reshape(v.shape)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (qa, qb), (ka, kb) in _pairs(cu_seqlens_q, cu_seqlens_k):
        g = impl.backward(
            dout[None, qa:qb], q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], out[None, qa:qb],
            lse[None, :, qa:qb], causal=causal, scale=scale, **_sequence_options(options, qa, qb, ka, kb),
        )
        dq[qa:qb], dk[ka:kb], dv[ka:kb] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def _check_hints(max_seqlen_q: int | None, max_seqlen_k: int | None) -> None:
    if (max_seqlen_q is None) != (max_seqlen_k is None):
        raise ValueError("max_seqlen_k: pass both max_seqlen_q and max_seqlen_k, or neither")


def _as_batch(
    cu_q: torch.Tensor, cu_k: torch.Tensor, tokens: tuple[int, int], hints: tuple[int | None, int | None]
) -> tuple[int, int, int] | None:
    """(n, Sq, Sk) when every packed sequence has the same lengths, else None. One sequence whose ``max_seqlen``
    hints are all of its ``tokens`` (a padded batch of one, as the SP ops pass it) is read from the hints, which
    the caller vouches for: no host read."""
    if cu_q.numel() == 2 and cu_k.numel() == 2 and hints == tokens:
        return 1, *tokens
    lq, lk = torch.diff(cu_q), torch.diff(cu_k)
    if lq.numel() != lk.numel() or lq.numel() == 0:
        return None
    if bool((lq == lq[0]).all()) and bool((lk == lk[0]).all()):
        return lq.numel(), int(lq[0]), int(lk[0])
    return None


def _pairs(cu_q: torch.Tensor, cu_k: torch.Tensor) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    bq, bk = cu_q.tolist(), cu_k.tolist()
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_k: {len(bk) - 1} sequences but cu_seqlens_q has {len(bq) - 1}")
    return list(zip(zip(bq, bq[1:]), zip(bk, bk[1:])))


# ----------------------------------------------------------------------------------------------------
# Differentiable single-device attention (what Ulysses and all-gather-KV run after their collectives)
# ----------------------------------------------------------------------------------------------------


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, scale, backend, cu_seqlens_q, cu_seqlens_k, max_seqlens, options):
        if cu_seqlens_q is None:
            out, lse = attention_block(q, k, v, causal=causal, scale=scale, backend=backend, **options)
        else:
            out, lse = attention_block_varlen(
                q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal, scale=scale,
                backend=backend, max_seqlen_q=max_seqlens[0], max_seqlen_k=max_seqlens[1], **options,
            )
        if sinks is not None:
            out, lse = apply_attention_sinks(out, lse, sinks)
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.options = (causal, scale, backend, cu_seqlens_q, cu_seqlens_k, max_seqlens, options)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        causal, scale, backend, cu_q, cu_k, max_seqlens, options = ctx.options
        if cu_q is None:
            grads = attention_block_backward(
                dout, q, k, v, out, lse, causal=causal, scale=scale, backend=backend, **options
            )
        else:
            grads = attention_block_varlen_backward(
                dout, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, scale=scale,
                backend=backend, max_seqlen_q=max_seqlens[0], max_seqlen_k=max_seqlens[1], **options,
            )
        d_sinks = None if sinks is None else attention_sinks_backward(dout, out, lse, sinks)
        return (*grads, d_sinks, None, None, None, None, None, None, None)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable single-device attention over the block kernels (padded, or packed with cu_seqlens and
    the optional ``max_seqlen_q``/``max_seqlen_k`` hints of ``attention_block_varlen``). ``window``,
    ``softcap``, ``q_positions``/``k_positions``: as ``attention_block``; ``sinks``: (H,) per-head sink
    logits added to the softmax denominator (``apply_attention_sinks``), differentiable."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_k: pass both cu_seqlens_q and cu_seqlens_k, or neither")
    _check_hints(max_seqlen_q, max_seqlen_k)
    check_sinks(sinks, q.shape[-2], q)
    options = _options(window, softcap, q_positions, k_positions)
    return _Attention.apply(
        q, k, v, sinks, causal, scale, backend, cu_seqlens_q, cu_seqlens_k, (max_seqlen_q, max_seqlen_k), options
    )
