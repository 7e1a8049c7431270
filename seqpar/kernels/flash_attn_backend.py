"""The ``"flash_attn"`` attention backend: flash-attn 2.x padded and varlen kernels that return the LSE.

Registered (by ``register()``, called from ``seqpar.kernels``) only when ``flash_attn`` imports and has the
low-level ``_flash_attn_forward`` / ``_flash_attn_backward`` (and varlen) functions of 2.x. It supports CUDA
tensors in fp16/bf16; flash-attn itself needs head dim <= 256 (we pad it to a multiple of 8 as flash-attn's
own wrappers do).

Contract differences smoothed over here:

* flash-attn's LSE for a row that sees no key is +inf (its non-split kernels); the contract says -inf. We
  flip it on the way out and back to +inf on the way in (so the backward gives p = exp(s - inf) = 0).
* ``window`` and ``softcap`` pass through as flash-attn's ``window_size`` and ``softcap`` (the same semantics);
  explicit ``q_positions``/``k_positions`` and a value head dim != q/k's are not features of this backend
  (``"auto"`` then picks another).
* The private functions' signatures changed across 2.x (``window_size`` tuple vs ``window_size_left/right``,
  ``softcap``; 8-tuple vs 4-tuple results). We pass only the keywords a function accepts and read the LSE
  by position for either result layout.

Nothing here runs on this project's CPU CI; ``bench/gpu_check.py`` checks it against the reference on a GPU.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

__all__ = ["IMPORT_ERROR", "available", "register"]

try:  # flash-attn is optional: everything else must work without it
    from flash_attn import flash_attn_interface as _fa

    _FWD = _fa._flash_attn_forward
    _BWD = _fa._flash_attn_backward
    _FWD_VARLEN = _fa._flash_attn_varlen_forward
    _BWD_VARLEN = _fa._flash_attn_varlen_backward
    IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 -- ImportError, or a CUDA extension that fails to load
    _fa = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_DTYPES = (torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether flash-attn imported with the functions this backend calls."""
    return _fa is not None


def _params(fn: Callable) -> set[str]:
    target = getattr(fn, "_init_fn", fn)  # torch.library.custom_op keeps the Python function here
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()


def _call(fn: Callable, args: tuple, options: dict[str, Any]) -> Any:
    """Call with the positional core and whichever optional keywords this flash-attn version accepts."""
    accepted = _params(fn)
    kwargs = {key: value for key, value in options.items() if not accepted or key in accepted}
    if accepted and "window_size" in accepted:  # flash-attn < 2.6 takes the window as one tuple
        kwargs["window_size"] = (kwargs.pop("window_size_left", -1), kwargs.pop("window_size_right", -1))
    return fn(*args, **kwargs)


_FWD_OPTIONS = {"window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
                "return_softmax": False}
_BWD_OPTIONS = {"window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
                "deterministic": False, "rng_state": None}


def _with(defaults: dict[str, Any], window: tuple[int, int] | None, softcap: float | None) -> dict[str, Any]:
    """The keyword options of one call: flash-attn's ``window_size_left/right`` (its window is ours: -1 is
    unbounded, bottom-right aligned, and with causal=True it also caps the right side at 0) and ``softcap``
    (0.0: off)."""
    options = dict(defaults)
    if window is not None:
        options["window_size_left"], options["window_size_right"] = window
    if softcap is not None:
        options["softcap"] = float(softcap)
    return options


def _out_lse(result: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # 2.6+: (out, lse, S_dmask, rng_state); older 2.x: (out, q, k, v, out_padded, lse, S_dmask, rng_state).
    return (result[0], result[1]) if len(result) == 4 else (result[0], result[5])


def _pad8(*ts: torch.Tensor) -> list[torch.Tensor]:
    """flash-attn needs a unit-stride head dim that is a multiple of 8: copy or zero-pad to that (any other
    strides it honours)."""
    d = ts[0].shape[-1]
    if d % 8 == 0:
        return [t.contiguous() if t.stride(-1) != 1 else t for t in ts]
    return [torch.nn.functional.pad(t, (0, 8 - d % 8)) for t in ts]


def _to_contract(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def _from_contract(lse: torch.Tensor) -> torch.Tensor:
    return lse.float().masked_fill(lse == float("-inf"), float("inf")).contiguous()


def _forward(q, k, v, *, causal, scale, window=None, softcap=None):
    d = q.shape[-1]
    if k.shape[1] == 0:
        return torch.zeros_like(q), torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
    qp, kp, vp = _pad8(q, k, v)
    out, lse = _out_lse(_call(_FWD, (qp, kp, vp, 0.0, scale, causal), _with(_FWD_OPTIONS, window, softcap)))
    return out[..., :d], _to_contract(lse)


def _backward(dout, q, k, v, out, lse, *, causal, scale, window=None, softcap=None):
    d = q.shape[-1]
    if k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dp, qp, kp, vp, op = _pad8(dout, q, k, v, out)
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    _call(_BWD, (dp, qp, kp, vp, op, _from_contract(lse), dq, dk, dv, 0.0, scale, causal),
          _with(_BWD_OPTIONS, window, softcap))
    return dq[..., :d], dk[..., :d], dv[..., :d]


def _device_cu(cu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """cu_seqlens as flash-attn reads them: contiguous int32 on the inputs' device (a strided view is not)."""
    return cu.to(device=device, dtype=torch.int32).contiguous()


def _max_len(cu: torch.Tensor) -> int:
    return int(torch.diff(cu).max()) if cu.numel() > 1 else 0


def _max_lens(cu_q, cu_k, max_seqlen_q: int | None, max_seqlen_k: int | None) -> tuple[int, int]:
    """The caller's hints (no host read), else read from cu_seqlens (a device sync on CUDA)."""
    if max_seqlen_q is not None:
        return int(max_seqlen_q), int(max_seqlen_k)
    return _max_len(cu_q), _max_len(cu_k)


def _forward_varlen(
    q, k, v, cu_q, cu_k, *, causal, scale, max_seqlen_q=None, max_seqlen_k=None, window=None, softcap=None
):
    d = q.shape[-1]
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    qp, kp, vp = _pad8(q, k, v)
    cu_q, cu_k = _device_cu(cu_q, q.device), _device_cu(cu_k, q.device)
    args = (qp, kp, vp, cu_q, cu_k, *_max_lens(cu_q, cu_k, max_seqlen_q, max_seqlen_k), 0.0, scale, causal)
    out, lse = _out_lse(_call(_FWD_VARLEN, args, _with(_FWD_OPTIONS, window, softcap)))
    if lse.dim() != 2:  # very old 2.x returned (B, H, max_seqlen_q); we need (H, T)
        raise RuntimeError("flash_attn: this version returns padded varlen LSE; seqpar needs flash-attn >= 2.6")
    return out[..., :d], _to_contract(lse)


def _backward_varlen(
    dout, q, k, v, out, lse, cu_q, cu_k, *, causal, scale, max_seqlen_q=None, max_seqlen_k=None, window=None,
    softcap=None,
):
    d = q.shape[-1]
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dp, qp, kp, vp, op = _pad8(dout, q, k, v, out)
    cu_q, cu_k = _device_cu(cu_q, q.device), _device_cu(cu_k, q.device)
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    args = (dp, qp, kp, vp, op, _from_contract(lse), dq, dk, dv, cu_q, cu_k,
            *_max_lens(cu_q, cu_k, max_seqlen_q, max_seqlen_k), 0.0, scale, causal)
    _call(_BWD_VARLEN, args, _with(_BWD_OPTIONS, window, softcap))
    return dq[..., :d], dk[..., :d], dv[..., :d]


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    return available() and device.type == "cuda" and dtype in _DTYPES


def register() -> bool:
    """Register the ``"flash_attn"`` backend if flash-attn imported; returns whether it did."""
    if not available():
        return False
    from seqpar.kernels.attention import AttentionBackend, register_attention_backend

    register_attention_backend(
        AttentionBackend(
            name="flash_attn", forward=_forward, backward=_backward, supports=_supports,
            forward_varlen=_forward_varlen, backward_varlen=_backward_varlen,
            # flash-attn 2 has the window and the softcap (default positions only); one head dim for q, k, v
            features=frozenset({"window", "softcap"}),
        )
    )
    return True
