"""Chunked linear attention with decay, initial state in and final state out (torch backend).

Recurrence: S_t = exp(g_t) * S_{t-1} + k_t v_t^T,  o_t = scale * q_t^T S_t.

Chunked form (chunk of C tokens, b_t = sum of g over the chunk up to and including t):

* intra-chunk:  o_t  = scale * sum_{s <= t} exp(b_t - b_s) (q_t . k_s) v_s       (C x C per chunk)
* inter-chunk:  o_t += scale * exp(b_t) q_t^T S_prev
* state:        S    = exp(b_C) S_prev + sum_s exp(b_C - b_s) k_s v_s^T

Every exponent is <= 0 (g <= 0, s <= t), so nothing overflows. Time O(S * C), not O(S^2). Autograd runs
through these torch ops; bf16/fp16 inputs are computed in float32 and returned in their own dtype.

``log_decay`` kinds: None (no decay), (H,) per-head constant (lightning attention, RetNet), (B, S, H) per-token
per-head (simple GLA, Mamba2), (B, S, H, Dk) per token and key dimension (GLA: S_t = diag(exp(g_t)) S_{t-1} +
k_t v_t^T, every key row of the state decays by its own factor; b_t, B are then per key dimension). The torch
backend runs a state pass (``chunk_local_states``: every chunk's entering state) then a batched output pass
(``chunk_local_output``); the SP algorithms (LASP-2, ZeCO) run the two passes apart, with their communication in
between, and add the incoming state's term (``linear_attention_inter`` / ``decayed_queries``) once it is known.
``chunk_state`` is the state contribution alone, for other backends. The GLA kind runs on the backends that have
its per-key intra-chunk weights (``LinearBackend.key_decay``: torch and triton; ``backend_for_decay``).

Backends: a registry like softmax attention's (``LinearBackend``, ``register_linear_backend``,
``get_linear_backend``). ``"torch"`` is defined here; ``"triton"`` registers itself from
``seqpar.kernels`` when triton imports (``triton_linear.register``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from seqpar.kernels.attention import resolve_backend

__all__ = [
    "LINEAR_BACKENDS",
    "LinearBackend",
    "available_linear_backends",
    "backend_for_decay",
    "chunk_local_output",
    "chunk_local_states",
    "chunk_state",
    "decayed_queries",
    "expand_log_decay",
    "get_linear_backend",
    "is_key_decay",
    "linear_attention_chunk",
    "linear_attention_inter",
    "register_linear_backend",
    "resolve_linear_backend",
    "state_decay",
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
        key_decay: whether it takes a per-key (GLA) decay (B, S, H, Dk); ``"auto"`` skips it for one otherwise.
    """

    name: str
    chunk: Callable
    supports: Callable[[torch.device, torch.dtype], bool]
    auto_eligible: Callable[[torch.device, torch.dtype], bool] | None = None
    needs: str = ""
    key_decay: bool = False


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
    return resolve_backend(_BACKENDS, _AUTO_ORDER, name, device, dtype, kind="linear-attention",
                           subject=" linear attention")


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
    *,
    check_values: bool = True,
) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or decay values are wrong. No communication.

    ``check_values=False`` skips the one check that reads tensor values (log_decay <= 0, a host sync), for a
    caller that checks the values itself (the SP ops fold it into their own single check)."""
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
        if tuple(log_decay.shape) not in ((h,), (b, s, h), (b, s, h, dk)):
            raise ValueError(
                f"log_decay: expected None, shape ({h},) per head, ({b}, {s}, {h}) per token or ({b}, {s}, {h}, "
                f"{dk}) per token and key dimension (GLA); got {tuple(log_decay.shape)}"
            )
        if check_values and bool((log_decay.detach() > 0).any()):
            raise ValueError(
                "log_decay: must be <= 0 (it is the log of a decay factor in (0, 1]); e.g. use -softplus(x)"
            )
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state: expected (B, H, Dk, Dv) = ({b}, {h}, {dk}, {v.shape[-1]}), "
            f"got {tuple(initial_state.shape)}"
        )


def is_key_decay(log_decay: torch.Tensor | None) -> bool:
    """True for the GLA kind, (B, S, H, Dk): the decay factor of a state is per key row."""
    return log_decay is not None and log_decay.dim() == 4


def expand_log_decay(
    log_decay: torch.Tensor | None, b: int, s: int, h: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """Any scalar decay kind as a (B, S, H) per-token tensor (zeros for no decay); a GLA (B, S, H, Dk) decay is
    returned as it is (in ``dtype``). Differentiable."""
    if log_decay is None:
        return torch.zeros(b, s, h, dtype=dtype, device=device)
    if log_decay.dim() == 1:
        return log_decay.to(dtype)[None, None, :].expand(b, s, h)
    return log_decay.to(dtype)


def total_log_decay(log_decay: torch.Tensor | None, b: int, s: int, h: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Sum of g over the local sequence, (B, H) ((B, H, Dk) for GLA): the log of the factor the whole chunk applies
    to an incoming state (per key row for GLA)."""
    if log_decay is not None and log_decay.dim() == 1:  # no (B, S, H) expansion for a constant
        return (s * log_decay.to(dtype))[None].expand(b, h)
    return expand_log_decay(log_decay, b, s, h, dtype, device).sum(1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def state_decay(log_decay: torch.Tensor, *, per_key: bool) -> torch.Tensor:
    """exp(D) shaped to scale (..., Dk, Dv) states: D (B, H) -> (B, H, 1, 1); with ``per_key`` (GLA) D (B, H, Dk)
    -> (B, H, Dk, 1), each key row of the state decays by its own factor."""
    factor = torch.exp(log_decay)
    return factor[..., None] if per_key else factor[..., None, None]


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

    Shapes: q, k (B, S, H, Dk); v (B, S, H, Dv); log_decay None, (H,), (B, S, H) or (B, S, H, Dk) (GLA), <= 0;
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
    impl = backend_for_decay(backend, q.device, q.dtype, log_decay)
    return impl.chunk(
        q, k, v, log_decay=log_decay, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size,
    )


def backend_for_decay(backend: str, device: torch.device, dtype: torch.dtype,
                      log_decay: torch.Tensor | None) -> LinearBackend:
    """``get_linear_backend``, except that a GLA (per-key) decay needs a backend with ``key_decay`` (torch,
    triton): ``"auto"`` falls back to torch from one without it; asking for one without it by name raises.

    Raises:
        ValueError: as ``get_linear_backend``; naming ``log_decay`` for a per-key decay with a non-torch backend.
    """
    impl = get_linear_backend(backend, device, dtype)
    if is_key_decay(log_decay) and not impl.key_decay:
        if backend != "auto":
            raise ValueError(f"log_decay: the {impl.name!r} backend has no per-key (GLA) decay; use "
                             f"backend='torch' (or 'auto')")
        impl = get_linear_backend("torch", device, dtype)
    return impl


def _by_chunk(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B, S, H, ...) -> (B, H, N, C, ...), zero-padded to N * C tokens. Padding is harmless at the end: a zero
    key adds nothing to the state and a zero log decay keeps it."""
    b, s = x.shape[:2]
    n = -(-s // chunk_size)
    if n * chunk_size != s:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, n * chunk_size - s))
    x = x.reshape(b, n, chunk_size, *x.shape[2:])
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def _chunk_cumsum(log_decay, b, s, h, cdt, device, chunk_size) -> torch.Tensor:
    """b_t per chunk: (B, H, N, C), or (B, H, N, C, Dk) for GLA."""
    return _by_chunk(expand_log_decay(log_decay, b, s, h, cdt, device), chunk_size).cumsum(3)


def chunk_local_states(
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state pass of the chunked form: ``(entering, final)`` with ``entering`` (B, H, N, Dk, Dv) the state
    entering each of the N = ceil(S / chunk_size) chunks (``initial_state`` or zeros for the first) and
    ``final`` (B, H, Dk, Dv) the state after the last token. Compute dtype (float64 for float64 input, else
    float32); differentiable; no checks (callers validate). O(S Dk Dv): one batched einsum for every chunk's own
    contribution, then a sequential N-step fold of (Dk, Dv) states.

    With no initial state, ``final`` is the slice's state contribution M that LASP-2 and ZeCO send, and the
    output pass (``chunk_local_output``) needs only ``entering``: the SP ops run this pass first, start their
    communication, then run the output pass while it flies; the state is computed once.
    """
    b, s, h, dk = k.shape
    cdt = _compute_dtype(k.dtype)
    bcum = _chunk_cumsum(log_decay, b, s, h, cdt, k.device, chunk_size)
    kc, vc = _by_chunk(k.to(cdt), chunk_size), _by_chunk(v.to(cdt), chunk_size)  # (B, H, N, C, D)
    if is_key_decay(log_decay):
        to_end = torch.exp(bcum[..., -1:, :] - bcum)  # (B, H, N, C, Dk), exp(B - b_s) per key dim
        own = torch.einsum("bhnck,bhncv->bhnkv", kc * to_end, vc)
        chunk_decay = torch.exp(bcum[..., -1, :])[..., None]  # (B, H, N, Dk, 1)
    else:
        to_end = torch.exp(bcum[..., -1:] - bcum)  # (B, H, N, C)
        own = torch.einsum("bhnck,bhncv->bhnkv", kc * to_end[..., None], vc)
        chunk_decay = torch.exp(bcum[..., -1])[..., None, None]  # (B, H, N, 1, 1)
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=cdt, device=k.device) if initial_state is None else (
        initial_state.to(cdt))
    entering = []
    for n in range(own.shape[2]):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + own[:, :, n]
    return torch.stack(entering, 2), state


def chunk_local_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    entering: torch.Tensor,
    *,
    scale: float,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The output pass of the chunked form, given the states entering each chunk (``chunk_local_states``):
    o (B, S, H, Dv) in the compute dtype; differentiable; no checks. All chunks at once (no loop over chunks):
    intra-chunk o_t = scale * sum_{s <= t, same chunk} exp(b_t - b_s) (q_t . k_s) v_s plus the chunk's entering
    state, scale * exp(b_t) q_t^T H_n. GLA's intra part weighs every key dimension by its own decay, a
    (C, C, Dk) tensor per chunk (memory O(S C Dk)): the torch backend is the reference-grade GLA path.
    """
    b, s, h, dk = q.shape
    cdt = _compute_dtype(q.dtype)
    c = chunk_size
    bcum = _chunk_cumsum(log_decay, b, s, h, cdt, q.device, c)
    qc, kc, vc = (_by_chunk(x.to(cdt), c) for x in (q, k, v))
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    if is_key_decay(log_decay):
        diff = bcum[..., :, None, :] - bcum[..., None, :, :]  # (B, H, N, C, C, Dk): b_t - b_s per key dim
        weights = torch.exp(diff.masked_fill(~causal[..., None], float("-inf")))
        scores = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", qc, kc, weights)
        q_decayed = qc * torch.exp(bcum)
    else:
        diff = bcum[..., :, None] - bcum[..., None, :]  # (B, H, N, C, C)
        scores = (qc @ kc.transpose(-1, -2)) * torch.exp(diff.masked_fill(~causal, float("-inf")))
        q_decayed = qc * torch.exp(bcum)[..., None]
    o = scale * (scores @ vc + q_decayed @ entering)  # (B, H, N, C, Dv)
    return o.permute(0, 2, 3, 1, 4).reshape(b, -1, h, v.shape[-1])[:, :s]


def _torch_chunk(q, k, v, *, log_decay, scale, initial_state, output_final_state, chunk_size):
    """The torch backend: the state pass, then the output pass (autograd runs through both); any strides."""
    entering, final = chunk_local_states(k, v, log_decay, chunk_size=chunk_size, initial_state=initial_state)
    o = chunk_local_output(q, k, v, log_decay, entering, scale=scale, chunk_size=chunk_size).to(q.dtype)
    return o, (final if output_final_state else None)


def decayed_queries(q: torch.Tensor, log_decay: torch.Tensor | None, *, scale: float) -> torch.Tensor:
    """scale * exp(b_t) q_t with b_t the cumulative log decay over the whole local sequence: (B, S, H, Dk) in the
    compute dtype. The incoming-state term is ``decayed_queries @ S_in`` and its VJP w.r.t. S_in is
    ``sum_t decayed_queries_t do_t^T``."""
    b, s, h, dk = q.shape
    cdt = _compute_dtype(q.dtype)
    bcum = expand_log_decay(log_decay, b, s, h, cdt, q.device).cumsum(1)
    return scale * q.to(cdt) * torch.exp(bcum if is_key_decay(log_decay) else bcum[..., None])


def linear_attention_inter(
    q: torch.Tensor, state: torch.Tensor, *, log_decay: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """The incoming-state term of the local output: scale * exp(b_t) q_t^T S_in, with b_t the local cumulative
    log decay (per key dimension for GLA). q (B, S, H, Dk), state (B, H, Dk, Dv) -> (B, S, H, Dv) in the compute
    dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_decayed = decayed_queries(q, log_decay, scale=scale)
    return torch.einsum("bshk,bhkv->bshv", q_decayed, state.to(q_decayed.dtype))


register_linear_backend(
    LinearBackend(name="torch", chunk=_torch_chunk, supports=lambda device, dtype: dtype.is_floating_point,
                  key_decay=True)
)


def chunk_state(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None) -> torch.Tensor:
    """M = sum_t exp(D - b_t) k_t v_t^T, a slice's state contribution with zero incoming state; differentiable.

    k (B, S, H, Dk), v (B, S, H, Dv), log_decay None / (H,) / (B, S, H) / (B, S, H, Dk) -> (B, H, Dk, Dv) in the
    compute dtype
    (float64 for float64 input, else float32); b_t is the cumulative log decay and D = b at the last token.
    The same value as the final state of ``linear_attention_chunk`` without initial state, but without the
    intra-chunk output: LASP-2 needs M before that output so that its all-gather can fly while the output is
    computed. One einsum, O(S Dk Dv), on every backend (a Triton state-only kernel would save no pass).
    """
    b, s, h, _ = k.shape
    cdt = _compute_dtype(k.dtype)
    bcum = expand_log_decay(log_decay, b, s, h, cdt, k.device).cumsum(1)  # (B, S, H[, Dk])
    to_end = torch.exp(bcum[:, -1:] - bcum)  # exp(D - b_t) <= 1
    if not is_key_decay(log_decay):
        to_end = to_end[..., None]
    return torch.einsum("bshk,bshv->bhkv", k.to(cdt) * to_end, v.to(cdt))
