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
    "AttentionBackend",
    "attention",
    "attention_block",
    "attention_block_backward",
    "attention_block_varlen",
    "attention_block_varlen_backward",
    "available_attention_backends",
    "get_attention_backend",
    "merge_attention_outputs",
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
    auto-eligible only on CUDA, since ``"auto"`` must not pick a numpy emulation."""

    name: str
    forward: Callable
    backward: Callable
    supports: Callable[[torch.device, torch.dtype], bool]
    forward_varlen: Callable | None = None
    backward_varlen: Callable | None = None
    auto_eligible: Callable[[torch.device, torch.dtype], bool] | None = None


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


def get_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """Resolve ``name`` (``"auto"`` or a registered name) for tensors on ``device`` of ``dtype``.

    ``"auto"`` is the first of ``_AUTO_ORDER`` (flash_attn, triton, torch) that is ``auto_eligible`` here.

    Raises:
        ValueError: unknown or retired backend name, or a named backend that cannot run on this device/dtype.
    """
    return resolve_backend(_BACKENDS, _AUTO_ORDER, name, device, dtype, kind="attention")


def resolve_backend(
    backends: dict, auto_order: tuple[str, ...], name: str, device: torch.device, dtype: torch.dtype, *,
    kind: str, subject: str = "",
):
    """The one resolution rule of every kernel registry (attention, linear attention): ``"auto"`` is the first of
    ``auto_order`` that is ``auto_eligible`` (else ``supports``) for ``device``/``dtype``; a name is that backend,
    if it ``supports`` them. ``kind`` and ``subject`` word the errors ("unknown {kind} backend", "'x'{subject}
    cannot run on ...").

    Raises:
        ValueError: naming ``backend``: a retired or unknown name, no eligible backend, or one that cannot run here.
    """
    check_retired_backend_name(name)
    if name == "auto":
        for candidate in auto_order:
            backend = backends.get(candidate)
            if backend is not None and (backend.auto_eligible or backend.supports)(device, dtype):
                return backend
        raise ValueError(f"backend: no {kind} backend supports {device.type}/{dtype}")
    if name not in backends:
        raise ValueError(f"backend: unknown {kind} backend {name!r}; registered: {sorted(backends)} or 'auto'")
    backend = backends[name]
    if not backend.supports(device, dtype):
        needs = getattr(backend, "needs", None)
        needs = f" (needs {needs})" if needs else ""
        raise ValueError(
            f"backend: {name!r}{subject} cannot run on {device.type} with {dtype}{needs}; use backend='auto'"
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
    b, h_kv, sk, d = k.shape
    dk = dk.view(b, h_kv, group, sk, d).sum(2)
    dv = dv.view(b, h_kv, group, sk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _use_cpu_flash(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _unit_stride_head_dim(*ts: torch.Tensor) -> list[torch.Tensor]:
    """The tensors with a unit-stride head dim (copied only where needed): aten's CPU flash kernel indexes the
    head dim without its stride, so x[..., ::2] or a (B, S, D, H).transpose(-1, -2) view would be read out of
    bounds. Every other stride it honours, so the (B, S, H, D) -> (B, H, S, D) transposes stay views."""
    return [t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in ts]


def _torch_forward_bhsd(q, k, v, causal, scale):
    """(B, H, S, D) tensors, every query row sees at least one key."""
    if not _use_cpu_flash(q):
        return _math_forward(q, k, v, causal, scale)
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
    sq, sk = q.shape[2], k.shape[2]
    mask = _causal_bias(sq, sk, q.dtype, q.device) if causal and sq != sk else None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal and mask is None, attn_mask=mask, scale=scale
    )


def _torch_forward(q, k, v, *, causal, scale):
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
    # NaN scores is NaN: put it back. (NaN in k or v does reach its output.) One pass over q, cheap next to S^2;
    # in place on the kernel's fresh tensors, so no copy and no host read.
    nan_rows = torch.isnan(q_rows).any(-1)  # (B, Sq - first, H)
    o.masked_fill_(nan_rows[..., None], float("nan"))
    rows_lse.masked_fill_(nan_rows.transpose(1, 2), float("nan"))
    if first == 0:  # the common case: the kernel's own tensors, no copy
        return o, rows_lse
    out = q.new_zeros(b, sq, h, v.shape[-1])
    lse = torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
    out[:, first:], lse[:, :, first:] = o, rows_lse
    return out, lse


def _torch_backward(dout, q, k, v, out, lse, *, causal, scale):
    sq, sk = q.shape[1], k.shape[1]
    first = max(sq - sk, 0) if causal else 0
    if sk == 0 or first == sq:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    t = lambda x: x.transpose(1, 2)  # noqa: E731 -- (B, S, H, D) <-> (B, H, S, D)
    lse_rows = lse[:, :, first:]
    if _use_cpu_flash(q):
        # aten's CPU flash backward honours every stride but the head dim's: views, no copies of the operands
        lse_rows = lse_rows.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
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
    )
)


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------


def attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against one block of keys; returns ``(out, lse)``. See the module docstring for shapes."""
    impl = get_attention_backend(backend, q.device, q.dtype)
    tracing.record("kernel", name="attention_block", causal=causal, sq=q.shape[1], sk=k.shape[1])
    return impl.forward(q, k, v, causal=causal, scale=_default_scale(q, scale))


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_block``. ``out``/``lse`` are the FINAL (merged) ones when the block is part of a
    larger softmax: then ``dq`` etc. are this block's share of the gradient."""
    impl = get_attention_backend(backend, q.device, q.dtype)
    tracing.record("kernel", name="attention_block_backward", causal=causal, sq=q.shape[1], sk=k.shape[1])
    return impl.backward(dout, q, k, v, out, lse, causal=causal, scale=_default_scale(q, scale))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed form: q (Tq, H, D), k/v (Tk, H_kv, D) -> out (Tq, H, D), lse (H, Tq).

    ``max_seqlen_q``/``max_seqlen_k``: the longest sequence of ``cu_seqlens_q``/``cu_seqlens_k``, both or
    neither. Given, a varlen backend (Triton, flash-attn) neither validates nor reads the boundaries on the host
    (they were validated once per step, where the batch was packed); None: it reads and validates them. The
    torch backend reads them either way (it runs sequence by sequence).

    Raises:
        ValueError: only one of the hints given; what the backend raises for bad shapes or cu_seqlens.
    """
    impl = get_attention_backend(backend, q.device, q.dtype)
    scale = _default_scale(q, scale)
    _check_hints(max_seqlen_q, max_seqlen_k)
    tracing.record("kernel", name="attention_block_varlen", causal=causal, sq=q.shape[0], sk=k.shape[0])
    if impl.forward_varlen is not None:
        return impl.forward_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
        )
    batched = _as_batch(cu_seqlens_q, cu_seqlens_k)
    if batched is not None:  # equal lengths: one padded call instead of a loop
        n, sq, sk = batched
        out, lse = impl.forward(
            q.view(n, sq, *q.shape[1:]), k.view(n, sk, *k.shape[1:]), v.view(n, sk, *v.shape[1:]),
            causal=causal, scale=scale,
        )
        return out.reshape(q.shape[0], *out.shape[2:]), lse.transpose(0, 1).reshape(lse.shape[1], -1)
    outs, lses = [], []
    for (qa, qb), (ka, kb) in _pairs(cu_seqlens_q, cu_seqlens_k):
        o, seq_lse = impl.forward(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal, scale=scale)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_block_varlen`` (the same hints and errors)."""
    impl = get_attention_backend(backend, q.device, q.dtype)
    scale = _default_scale(q, scale)
    _check_hints(max_seqlen_q, max_seqlen_k)
    tracing.record("kernel", name="attention_block_varlen_backward", causal=causal, sq=q.shape[0], sk=k.shape[0])
    if impl.backward_varlen is not None:
        return impl.backward_varlen(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        )
    batched = _as_batch(cu_seqlens_q, cu_seqlens_k)
    if batched is not None:
        n, sq, sk = batched
        as_q = lambda x: x.reshape(n, sq, *x.shape[1:])  # noqa: E731
        as_k = lambda x: x.reshape(n, sk, *x.shape[1:])  # noqa: E731
        g = impl.backward(
            as_q(dout), as_q(q), as_k(k), as_k(v), as_q(out), lse.reshape(lse.shape[0], n, sq).transpose(0, 1),
            causal=causal, scale=scale,
        )
        return g[0].reshape(q.shape), g[1].reshape(k.shape), g[2].reshape(v.shape)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for (qa, qb), (ka, kb) in _pairs(cu_seqlens_q, cu_seqlens_k):
        g = impl.backward(
            dout[None, qa:qb], q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], out[None, qa:qb],
            lse[None, :, qa:qb], causal=causal, scale=scale,
        )
        dq[qa:qb], dk[ka:kb], dv[ka:kb] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def _check_hints(max_seqlen_q: int | None, max_seqlen_k: int | None) -> None:
    if (max_seqlen_q is None) != (max_seqlen_k is None):
        raise ValueError("max_seqlen_k: pass both max_seqlen_q and max_seqlen_k, or neither")


def _as_batch(cu_q: torch.Tensor, cu_k: torch.Tensor) -> tuple[int, int, int] | None:
    """(n, Sq, Sk) when every packed sequence has the same lengths, else None."""
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
    def forward(ctx, q, k, v, causal, scale, backend, cu_seqlens_q, cu_seqlens_k, max_seqlens):
        if cu_seqlens_q is None:
            out, lse = attention_block(q, k, v, causal=causal, scale=scale, backend=backend)
        else:
            out, lse = attention_block_varlen(
                q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal, scale=scale,
                backend=backend, max_seqlen_q=max_seqlens[0], max_seqlen_k=max_seqlens[1],
            )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, backend, cu_seqlens_q, cu_seqlens_k, max_seqlens)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, backend, cu_q, cu_k, max_seqlens = ctx.options
        if cu_q is None:
            grads = attention_block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, backend=backend)
        else:
            grads = attention_block_varlen_backward(
                dout, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, scale=scale,
                backend=backend, max_seqlen_q=max_seqlens[0], max_seqlen_k=max_seqlens[1],
            )
        return (*grads, None, None, None, None, None, None)


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
) -> torch.Tensor:
    """Differentiable single-device attention over the block kernels (padded, or packed with cu_seqlens and
    the optional ``max_seqlen_q``/``max_seqlen_k`` hints of ``attention_block_varlen``)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_k: pass both cu_seqlens_q and cu_seqlens_k, or neither")
    _check_hints(max_seqlen_q, max_seqlen_k)
    return _Attention.apply(q, k, v, causal, scale, backend, cu_seqlens_q, cu_seqlens_k, (max_seqlen_q, max_seqlen_k))
