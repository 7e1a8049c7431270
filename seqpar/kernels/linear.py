"""Chunked linear attention with decay, initial state in and final state out (torch backend).

Recurrence: S_t = exp(g_t) * S_{t-1} + k_t v_t^T,  o_t = scale * q_t^T S_t.

Chunked form (chunk of C tokens, b_t = sum of g over the chunk up to and including t):

* intra-chunk:  o_t  = scale * sum_{s <= t} exp(b_t - b_s) (q_t . k_s) v_s       (C x C per chunk)
* inter-chunk:  o_t += scale * exp(b_t) q_t^T S_prev
* state:        S    = exp(b_C) S_prev + sum_s exp(b_C - b_s) k_s v_s^T

Every exponent is <= 0 (g <= 0, s <= t), so nothing overflows. Time O(S * C), not O(S^2). Autograd runs
through these torch ops; bf16/fp16 inputs are computed in float32 and returned in their own dtype.

``log_decay`` kinds: None (no decay), (H,) per-head constant (lightning attention, RetNet), (B, S, H) per-token
per-head (simple GLA, Mamba2). The SP algorithms (LASP-2, ZeCO) use the pieces separately: the local chunk's
state contribution with zero initial state, its total decay, and the correction a rank adds once its incoming
state is known (``linear_attention_inter``), and the state contribution alone (``chunk_state``).

Backends: a registry like softmax attention's (``LinearBackend``, ``register_linear_backend``,
``get_linear_backend``). ``"torch"`` is defined here; ``"triton"`` registers itself from
``seqpar.kernels`` when triton imports (``triton_linear.register``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from seqpar.kernels.attention import check_retired_backend_name

__all__ = [
    "LINEAR_BACKENDS",
    "LinearBackend",
    "available_linear_backends",
    "chunk_state",
    "expand_log_decay",
    "get_linear_backend",
    "linear_attention_chunk",
    "linear_attention_inter",
    "register_linear_backend",
    "resolve_linear_backend",
    "total_log_decay",
    "validate_linear_inputs",
]


@dataclass(frozen=True)
class LinearBackend:
    """A chunked linear-attention kernel.

    Attributes:
        name: what ``backend=`` selects it by.
        chunk: ``chunk(q, k, v, *, log_decay, scale, initial_state, output_final_state, chunk_size)
            -> (o, final_state or None)``, differentiable, with the contract of ``linear_attention_chunk``
            (inputs already validated; ``scale`` already resolved to a float).
        supports: ``supports(device, dtype)``: where asking for it by name may run it.
        auto_eligible: where ``backend="auto"`` may pick it (default: wherever it ``supports``). Triton runs
            on CPU under the interpreter when asked by name, but ``"auto"`` must not pick a numpy emulation.
            (The same rule as ``AttentionBackend``: a backend is named for its kernels.)
        needs: a short requirement for the error message when it cannot run (e.g. "CUDA").
    """

    name: str
    chunk: Callable
    supports: Callable[[torch.device, torch.dtype], bool]
    auto_eligible: Callable[[torch.device, torch.dtype], bool] | None = None
    needs: str = ""


_BACKENDS: dict[str, LinearBackend] = {}
_AUTO_ORDER = ("triton", "torch")
LINEAR_BACKENDS = ("auto", "torch", "triton")
"""Backend names this package defines (``"triton"`` is registered only when triton imports). Kept for
compatibility; ``available_linear_backends()`` lists what is registered now."""


def register_linear_backend(backend: LinearBackend) -> None:
    """Add (or replace) a linear-attention backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def available_linear_backends() -> list[str]:
    return list(_BACKENDS)


def get_linear_backend(name: str, device: torch.device, dtype: torch.dtype) -> LinearBackend:
    """Resolve ``name`` (``"auto"`` or a registered name) for tensors on ``device`` of ``dtype``.

    ``"auto"`` is the first of ``("triton", "torch")`` that is ``auto_eligible`` here: Triton on CUDA
    (fp16/bf16/fp32), else torch, so on CPU it is always torch.

    Raises:
        ValueError: naming ``backend``: an unknown or retired name, or a named backend that cannot run on this
            device/dtype.
    """
    check_retired_backend_name(name)
    if name == "auto":
        for candidate in _AUTO_ORDER:
            backend = _BACKENDS.get(candidate)
            if backend is not None and (backend.auto_eligible or backend.supports)(device, dtype):
                return backend
        raise ValueError(f"backend: no linear-attention backend supports {device.type}/{dtype}")
    if name not in _BACKENDS:
        raise ValueError(
            f"backend: unknown linear-attention backend {name!r}; registered: {sorted(_BACKENDS)} or 'auto'"
        )
    backend = _BACKENDS[name]
    if not backend.supports(device, dtype):
        needs = f" (needs {backend.needs})" if backend.needs else ""
        raise ValueError(
            f"backend: {name!r} linear attention cannot run on {device.type} with {dtype}{needs}; use backend='auto'"
        )
    return backend


def resolve_linear_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The name ``get_linear_backend`` resolves ``backend`` to (compatibility helper for callers that only
    check or log the choice). Raises ValueError as ``get_linear_backend``."""
    return get_linear_backend(backend, device, dtype).name


def validate_linear_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or decay values are wrong. No communication."""
    if q.dim() != 4:
        raise ValueError(f"q: expected (B, S, H, Dk), got shape {tuple(q.shape)}")
    b, s, h, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {tuple(q.shape)} like q, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected (B, S, H, Dv) = ({b}, {s}, {h}, Dv), got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: dtypes must match q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    if log_decay is not None:
        if tuple(log_decay.shape) not in ((h,), (b, s, h)):
            raise ValueError(
                f"log_decay: expected None, shape ({h},) per head, or ({b}, {s}, {h}) per token; "
                f"got {tuple(log_decay.shape)}"
            )
        if bool((log_decay.detach() > 0).any()):
            raise ValueError("log_decay: must be <= 0 (it is the log of a decay factor in (0, 1]); e.g. use -softplus(x)")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state: expected (B, H, Dk, Dv) = ({b}, {h}, {dk}, {v.shape[-1]}), got {tuple(initial_state.shape)}"
        )


def expand_log_decay(log_decay: torch.Tensor | None, b: int, s: int, h: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Any decay kind as a (B, S, H) per-token tensor (zeros for no decay); differentiable."""
    if log_decay is None:
        return torch.zeros(b, s, h, dtype=dtype, device=device)
    if log_decay.dim() == 1:
        return log_decay.to(dtype)[None, None, :].expand(b, s, h)
    return log_decay.to(dtype)


def total_log_decay(log_decay: torch.Tensor | None, b: int, s: int, h: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Sum of g over the local sequence, (B, H): the log of the factor the whole chunk applies to an incoming state."""
    return expand_log_decay(log_decay, b, s, h, dtype, device).sum(1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked linear attention; returns ``(o, final_state)`` (final_state None unless requested).

    Shapes: q, k (B, S, H, Dk); v (B, S, H, Dv); log_decay None, (H,) or (B, S, H), all <= 0;
    initial_state (B, H, Dk, Dv); o (B, S, H, Dv) in q's dtype; final_state (B, H, Dk, Dv) float32
    (float64 for float64 input). ``backend``: see ``get_linear_backend`` (torch on CPU unless
    ``"triton"`` is asked for; the Triton path rounds ``chunk_size``, see ``triton_linear.chunk_size_for``).
    Any strides. A NaN in q, k or v reaches the outputs that depend on it.

    Raises:
        ValueError: shape/dtype mismatch, positive log_decay, chunk_size < 1, a backend that cannot run here.
    """
    validate_linear_inputs(q, k, v, log_decay, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    impl = get_linear_backend(backend, q.device, q.dtype)
    return impl.chunk(
        q, k, v, log_decay=log_decay, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size,
    )


def _torch_chunk(q, k, v, *, log_decay, scale, initial_state, output_final_state, chunk_size):
    """The torch backend: the chunked form in torch ops (autograd runs through them); any strides."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    cdt = _compute_dtype(q.dtype)
    g = expand_log_decay(log_decay, b, s, h, cdt, q.device)
    state = (
        torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device) if initial_state is None else initial_state.to(cdt)
    )
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    outs = []
    # split, not slice: the backward of one split is one concatenation, while every slice's backward would
    # allocate a full-length gradient (quadratic in S over all chunks)
    chunks = zip(*(x.split(chunk_size, dim=1) for x in (qc, kc, vc, g)))
    for q_c, k_c, v_c, g_c in chunks:
        qi, ki, vi = (x.transpose(1, 2) for x in (q_c, k_c, v_c))  # (B, H, C, D)
        bcum = g_c.transpose(1, 2).cumsum(-1)  # (B, H, C)
        c = q_c.shape[1]
        diff = bcum[..., :, None] - bcum[..., None, :]  # b_t - b_s
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        weights = torch.exp(diff.masked_fill(~causal, float("-inf")))
        scores = (qi @ ki.transpose(-1, -2)) * weights
        o = scores @ vi + torch.exp(bcum)[..., None] * (qi @ state)
        outs.append((scale * o).transpose(1, 2))
        to_end = torch.exp(bcum[..., -1:] - bcum)[..., None]  # exp(b_C - b_s)
        state = torch.exp(bcum[..., -1])[..., None, None] * state + (ki * to_end).transpose(-1, -2) @ vi
    o = torch.cat(outs, 1).to(q.dtype)
    return o, (state if output_final_state else None)


def linear_attention_inter(
    q: torch.Tensor, state: torch.Tensor, *, log_decay: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """The incoming-state term of the local output: scale * exp(b_t) q_t^T S_in, with b_t the local cumulative
    log decay. q (B, S, H, Dk), state (B, H, Dk, Dv) -> (B, S, H, Dv) in the compute dtype."""
    b, s, h, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    cdt = _compute_dtype(q.dtype)
    bcum = expand_log_decay(log_decay, b, s, h, cdt, q.device).cumsum(1)  # (B, S, H)
    return scale * torch.exp(bcum)[..., None] * torch.einsum("bshk,bhkv->bshv", q.to(cdt), state.to(cdt))


register_linear_backend(
    LinearBackend(name="torch", chunk=_torch_chunk, supports=lambda device, dtype: dtype.is_floating_point)
)


def chunk_state(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None) -> torch.Tensor:
    """M = sum_t exp(D - b_t) k_t v_t^T, a slice's state contribution with zero incoming state; differentiable.

    k (B, S, H, Dk), v (B, S, H, Dv), log_decay None / (H,) / (B, S, H) -> (B, H, Dk, Dv) in the compute dtype
    (float64 for float64 input, else float32); b_t is the cumulative log decay and D = b at the last token.
    The same value as the final state of ``linear_attention_chunk`` without initial state, but without the
    intra-chunk output: LASP-2 needs M before that output so that its all-gather can fly while the output is
    computed. One einsum, O(S Dk Dv), on every backend (a Triton state-only kernel would save no pass).
    """
    b, s, h, _ = k.shape
    cdt = _compute_dtype(k.dtype)
    bcum = expand_log_decay(log_decay, b, s, h, cdt, k.device).cumsum(1)  # (B, S, H)
    to_end = torch.exp(bcum[:, -1:] - bcum)  # exp(D - b_t) <= 1
    return torch.einsum("bshk,bshv->bhkv", k.to(cdt) * to_end[..., None], v.to(cdt))
