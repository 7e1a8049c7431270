"""Launch code of the Triton softmax-attention kernels: configs, argument checks, entry points, registration.

The ``@triton.jit`` kernels live in ``triton_attention_kernels.py``; this module decides block sizes, checks
arguments, lays tensors out for the kernels and registers the backends.

Shapes and conventions are those of ``seqpar.kernels.attention`` (the contract): q (B, Sq, H, D), k
(B, Sk, H_kv, D), v (B, Sk, H_kv, Dv) with H % H_kv == 0 (Dv may differ from D: MLA), out (B, Sq, H, Dv) in q's
dtype, lse (B, H, Sq) float32; packed form (T, H, D) with int32 ``cu_seqlens_q``/``cu_seqlens_k`` and lse
(H, T); causal is bottom-right aligned (query i sees key j when j <= i + Sk - Sq); rows that see no key give
out = 0, lse = -inf. fp16/bf16/fp32 inputs, float32 accumulation, D, Dv <= 256 (any size; non powers of two
are masked). Any strides: tensors whose head dim is not unit-stride are copied (the kernels add head-dim
offsets without a stride); every other stride, lse's and the positions' included, is passed on.
Padded batches run as the packed form with a batch stride (``VARLEN=False``), so there is one code path.

Options (the contract's, all in the kernels): ``softcap``; ``window=(left, right)`` (flash-attn's, -1 =
unbounded; with causal also j <= i), whose blocks wholly outside the band are not visited;
``q_positions``/``k_positions`` (int, (B, S) padded or (T,) packed): the positions the causal mask and the
window compare instead of the bottom-right aligned ones (the SP ops pass their shards' global positions).
The kernels find the blocks a tile's band reaches by a binary search in the positions, which works where they
never decrease within a sequence (every SP layout's shards); a flag computed on the device (no host read) sends
any other positions through every block, masked: correct, not fast.
Sinks are not a kernel option: they enter once, after the merge (``kernels.attention.apply_attention_sinks``).

``register()`` registers one backend, ``"triton"`` (named for its kernels, like the linear-attention one):
asked for by name it runs on CUDA, and on CPU tensors when triton was imported with ``TRITON_INTERPRET=1``
(the tests); ``backend="auto"`` picks it on CUDA only (``auto_eligible``), so "auto" on CPU stays torch.

Raises ``ValueError`` (naming the argument) for bad shapes, dtypes, head dims > 256, bad cu_seqlens, a bad
``window``/``softcap``, or positions of the wrong shape or dtype (or only one of the two).
"""

from __future__ import annotations

import math

import torch
import triton

from seqpar.kernels.attention import check_softcap, check_window
from seqpar.kernels.triton_attention_kernels import (
    LOG2E,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
    _attn_fwd_kernel,
)
from seqpar.kernels.varlen import validate_cu_seqlens

__all__ = [
    "INTERPRETED",
    "register",
    "triton_attention_backward",
    "triton_attention_backward_varlen",
    "triton_attention_forward",
    "triton_attention_forward_varlen",
    "triton_attention_merge",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


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

    def __init__(self, q, k, v, cu_q, cu_k, max_q=None, max_k=None):
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
        if k.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"v: shape {tuple(v.shape)} must equal k's {tuple(k.shape)} but for the head dim")
        if k.shape[-1] != q.shape[-1] or (not self.varlen and k.shape[0] != q.shape[0]):
            raise ValueError(f"k: expected q's batch and head dim {tuple(q.shape)}, got {tuple(k.shape)}")
        self.h, self.h_kv, self.d, self.dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        if self.h_kv == 0 or self.h % self.h_kv:
            raise ValueError(f"k: q's {self.h} heads must be a multiple of k/v's {self.h_kv} heads (GQA)")
        for name, size in (("q", self.d), ("v", self.dv)):
            if size > MAX_HEAD_DIM:
                raise ValueError(f"{name}: head dim {size} > {MAX_HEAD_DIM} is not supported by the triton kernels")
        self.group = self.h // self.h_kv
        if self.varlen and max_q is not None:
            # The caller's hints (computed once per step where the batch was packed and validated): read nothing
            # of cu_seqlens on the host, so the launch does not wait for the device. Only metadata is checked.
            for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
                if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
                    raise ValueError(f"{name}: expected a 1-D int32 tensor [0, len_0, len_0+len_1, ...]")
            if cu_q.numel() != cu_k.numel():
                raise ValueError(f"cu_seqlens_k: {cu_k.numel() - 1} sequences but cu_seqlens_q has {cu_q.numel() - 1}")
            self.batch, self.seqlen_q, self.seqlen_k = cu_q.numel() - 1, int(max_q), int(max_k)
        elif self.varlen:
            bq = validate_cu_seqlens(cu_q, q.shape[0], name="cu_seqlens_q", allow_empty=True)
            bk = validate_cu_seqlens(cu_k, k.shape[0], name="cu_seqlens_k", allow_empty=True)
            if len(bq) != len(bk):
                raise ValueError(f"cu_seqlens_k: {len(bk) - 1} sequences but cu_seqlens_q has {len(bq) - 1}")
            self.batch = len(bq) - 1
            self.seqlen_q = max((b - a for a, b in zip(bq, bq[1:])), default=0)
            self.seqlen_k = max((b - a for a, b in zip(bk, bk[1:])), default=0)
        if self.varlen:
            # the kernels read entry b at Cu + b: unit stride (a cu_seqlens[::2] view would be read wrongly)
            self.cu_q, self.cu_k = cu_q.to(q.device).contiguous(), cu_k.to(q.device).contiguous()
        else:
            self.batch, self.seqlen_q, self.seqlen_k = q.shape[0], q.shape[1], k.shape[1]
            self.cu_q = self.cu_k = q  # never read when VARLEN is False; any pointer will do
        self.block_d = max(16, triton.next_power_of_2(self.d))  # tl.dot needs >= 16
        self.block_dv = max(16, triton.next_power_of_2(self.dv))

    def bsh(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, seq, head) strides of a q/k/v/out-shaped tensor."""
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def bhs(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, seq) strides of an lse-shaped tensor: (B, H, S) padded, (H, T) packed."""
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def lse_shape(self, q: torch.Tensor) -> tuple[int, ...]:
        return (self.h, q.shape[0]) if self.varlen else (q.shape[0], self.h, q.shape[1])

    def out_shape(self, q: torch.Tensor) -> tuple[int, ...]:
        return (*q.shape[:-1], self.dv)


class _Mask:
    """The kernels' band arguments of one call: ``win_left``/``win_right`` with the LEFT/RIGHT flags (causal is
    RIGHT with 0), the positions (POSITIONS, their pointers and strides) and the device flag of their order."""

    def __init__(self, p: _Problem, q, k, causal, window, q_positions, k_positions):
        window = check_window(window)
        if (q_positions is None) != (k_positions is None):
            raise ValueError("k_positions: pass both q_positions and k_positions, or neither")
        left, right = (-1, -1) if window is None else window
        self.flags = {"LEFT": left >= 0, "RIGHT": bool(causal) or right >= 0}
        self.left, self.right = max(left, 0), 0 if causal else max(right, 0)
        self.steps_q = max(1, int(p.seqlen_q).bit_length() + 1)  # binary-search steps over one sequence
        self.steps_k = max(1, int(p.seqlen_k).bit_length() + 1)
        if q_positions is None:
            self.q_pos = self.k_pos = self.sorted = q  # never read without POSITIONS
            self.q_strides = self.k_strides = (0, 0)
            return
        self.q_pos = self._checked(q_positions, "q_positions", q, p)
        self.k_pos = self._checked(k_positions, "k_positions", k, p)
        self.q_strides, self.k_strides = self._strides(self.q_pos, p), self._strides(self.k_pos, p)
        self.flags["POSITIONS"] = True
        if self.flags["LEFT"] or self.flags["RIGHT"]:
            self.sorted = (_nondecreasing(self.q_pos, p.cu_q if p.varlen else None)
                           & _nondecreasing(self.k_pos, p.cu_k if p.varlen else None)).to(torch.int32).reshape(1)
        else:  # no band: every block is visited anyway
            self.sorted = torch.ones(1, dtype=torch.int32, device=q.device)

    @staticmethod
    def _checked(pos, name, x, p):
        shape = (x.shape[0],) if p.varlen else tuple(x.shape[:2])
        if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != shape or pos.dtype.is_floating_point:
            got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(f"{name}: expected an integer tensor of shape {shape}, got {got}")
        return pos.to(device=x.device, dtype=torch.int64)

    @staticmethod
    def _strides(pos, p):
        return (0, pos.stride(0)) if p.varlen else (pos.stride(0), pos.stride(1))

    def args(self) -> tuple:
        return (*self.q_strides, *self.k_strides)


def _nondecreasing(pos: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
    """Bool scalar on pos's device (no host read): positions never decrease within a sequence, i.e. along the rows
    of a (B, S) tensor, or between the ``cu`` boundaries of a packed (T,) tensor."""
    if pos.dim() == 2:
        return (pos[:, 1:] >= pos[:, :-1]).all()
    steps = pos[1:] >= pos[:-1]
    if cu is None or steps.numel() == 0:
        return steps.all()
    # a decrease is allowed across a boundary: after token cu[i] - 1 (slot 0 takes -1, the last slot T - 1)
    allowed = torch.zeros(steps.numel() + 2, dtype=torch.bool, device=pos.device)
    allowed[(cu[1:-1].long() - 1).clamp(-1, steps.numel()) + 1] = True
    return (steps | allowed[1:-1]).all()


def _lastdim_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------------


def _softcap_args(softcap: float | None) -> tuple[float, dict]:
    """The kernels' ``cap`` argument (the softcap in log2 units: scores are kept in log2 units) and SOFTCAP flag."""
    softcap = check_softcap(softcap)
    return (1.0, {}) if softcap is None else (float(softcap) * LOG2E, {"SOFTCAP": True})


def _forward(q, k, v, cu_q, cu_k, causal, scale, out_acc=None, lse_acc=None, max_q=None, max_k=None, softcap=None,
             window=None, q_positions=None, k_positions=None):
    """Shared forward; with out_acc/lse_acc it merges into them and returns float32 out."""
    p = _Problem(q, k, v, cu_q, cu_k, max_q, max_k)
    q, k, v = _lastdim_contiguous(q, k, v)
    mask = _Mask(p, q, k, causal, window, q_positions, k_positions)
    merge = out_acc is not None
    if merge:
        if tuple(out_acc.shape) != p.out_shape(q):
            raise ValueError(f"out_acc: expected shape {p.out_shape(q)} like q with v's head dim, got "
                             f"{tuple(out_acc.shape)}")
        if tuple(lse_acc.shape) != p.lse_shape(q):
            raise ValueError(f"lse_acc: expected shape {p.lse_shape(q)}, got {tuple(lse_acc.shape)}")
        out_acc = _lastdim_contiguous(out_acc.to(device=q.device, dtype=torch.float32))[0]
        lse_acc = lse_acc.to(device=q.device, dtype=torch.float32)
    out = torch.empty(p.out_shape(q), dtype=torch.float32 if merge else q.dtype, device=q.device)
    lse = torch.empty(p.lse_shape(q), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or p.batch == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    acc_out, acc_lse = (out_acc, lse_acc) if merge else (out, lse)  # unread unless MERGE
    cfg = _configs(max(p.d, p.dv), q.device, q.dtype)["fwd"]
    grid = (triton.cdiv(p.seqlen_q, cfg["BLOCK_M"]), p.batch * p.h)
    cap, cap_flag = _softcap_args(softcap)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, acc_out, acc_lse, p.cu_q, p.cu_k, mask.q_pos, mask.k_pos, mask.sorted,
        *p.bsh(q), *p.bsh(k), *p.bsh(v), *p.bsh(out), *p.bhs(lse), *p.bsh(acc_out), *p.bhs(acc_lse), *mask.args(),
        p.seqlen_q, p.seqlen_k, p.h, p.group, scale * LOG2E, cap, mask.left, mask.right, mask.steps_k,
        HEAD_DIM=p.d, HEAD_DV=p.dv, BLOCK_D=p.block_d, BLOCK_DV=p.block_dv, VARLEN=p.varlen, MERGE=merge,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), **cap_flag, **mask.flags, **cfg,
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, max_q=None, max_k=None, softcap=None, window=None,
              q_positions=None, k_positions=None):
    p = _Problem(q, k, v, cu_q, cu_k, max_q, max_k)
    if tuple(dout.shape) != p.out_shape(q) or tuple(out.shape) != p.out_shape(q):
        raise ValueError(
            f"dout, out: expected shape {p.out_shape(q)} like q with v's head dim, got {tuple(dout.shape)}, "
            f"{tuple(out.shape)}"
        )
    if tuple(lse.shape) != p.lse_shape(q):
        raise ValueError(f"lse: expected shape {p.lse_shape(q)}, got {tuple(lse.shape)}")
    q, k, v, dout, out = _lastdim_contiguous(q, k, v, dout, out)
    mask = _Mask(p, q, k, causal, window, q_positions, k_positions)
    lse = lse.to(torch.float32)  # any strides: the kernels take lse's own
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if p.batch == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(p.lse_shape(q), dtype=torch.float32, device=q.device)
    cfgs = _configs(max(p.d, p.dv), q.device, q.dtype)
    pre = cfgs["pre"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(p.seqlen_q, pre["BLOCK_M"]), p.batch * p.h)](
        out, dout, delta, p.cu_q, *p.bsh(out), *p.bsh(dout), *p.bhs(delta), p.seqlen_q, p.h,
        HEAD_DIM=p.dv, BLOCK_D=p.block_dv, VARLEN=p.varlen, **pre,
    )
    cap, cap_flag = _softcap_args(softcap)
    common = dict(HEAD_DIM=p.d, HEAD_DV=p.dv, BLOCK_D=p.block_d, BLOCK_DV=p.block_dv, VARLEN=p.varlen,
                  PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), **cap_flag, **mask.flags)
    args = (*p.bsh(q), *p.bsh(k), *p.bsh(v), *p.bsh(dout), *p.bhs(lse), *p.bhs(delta), *mask.args())
    pointers = (q, k, v, dout, lse, delta)
    cfg = cfgs["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(p.seqlen_k, cfg["BLOCK_N"]), p.batch * p.h_kv)](
        *pointers, dk, dv, p.cu_q, p.cu_k, mask.q_pos, mask.k_pos, mask.sorted, *args, *p.bsh(dk), *p.bsh(dv),
        p.seqlen_q, p.seqlen_k, p.h_kv, p.group, scale, scale * LOG2E, cap, mask.left, mask.right, mask.steps_q,
        **common, **cfg,
    )
    cfg = cfgs["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(p.seqlen_q, cfg["BLOCK_M"]), p.batch * p.h)](
        *pointers, dq, p.cu_q, p.cu_k, mask.q_pos, mask.k_pos, mask.sorted, *args, *p.bsh(dq),
        p.seqlen_q, p.seqlen_k, p.h, p.group, scale, scale * LOG2E, cap, mask.left, mask.right, mask.steps_k,
        **common, **cfg,
    )
    return dq, dk, dv


def triton_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    window: tuple[int, int] | None = None, softcap: float | None = None, q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded forward: q (B, Sq, H, D), k (B, Sk, H_kv, D), v (B, Sk, H_kv, Dv) -> out (B, Sq, H, Dv) in q's
    dtype, lse (B, H, Sq) float32. Options as the module docstring (positions (B, Sq) / (B, Sk))."""
    return _forward(q, k, v, None, None, causal, _scale(q, scale), softcap=softcap, window=window,
                    q_positions=q_positions, k_positions=k_positions)


def triton_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, causal: bool = False, scale: float | None = None, window: tuple[int, int] | None = None,
    softcap: float | None = None, q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded backward -> (dq, dk, dv) in the inputs' dtypes. ``out``/``lse`` may be the final merged ones
    of a larger softmax: the result is then this block's share of the gradient. lse may have any strides."""
    return _backward(dout, q, k, v, out, lse, None, None, causal, _scale(q, scale), softcap=softcap, window=window,
                     q_positions=q_positions, k_positions=k_positions)


def triton_attention_forward_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    *, causal: bool = False, scale: float | None = None, max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None, window: tuple[int, int] | None = None, softcap: float | None = None,
    q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed forward: q (Tq, H, D), k (Tk, H_kv, D), v (Tk, H_kv, Dv) -> out (Tq, H, Dv), lse (H, Tq) float32.
    With the ``max_seqlen_*`` hints (both or neither) cu_seqlens are neither validated nor read on the host.
    Options as the module docstring (positions (Tq,) / (Tk,))."""
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, _scale(q, scale), None, None, max_seqlen_q,
                    max_seqlen_k, softcap=softcap, window=window, q_positions=q_positions, k_positions=k_positions)


def triton_attention_backward_varlen(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, window: tuple[int, int] | None = None,
    softcap: float | None = None, q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed backward -> (dq, dk, dv); the hints and options as in ``triton_attention_forward_varlen``."""
    return _backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, _scale(q, scale), max_seqlen_q,
                     max_seqlen_k, softcap=softcap, window=window, q_positions=q_positions, k_positions=k_positions)


def triton_attention_merge(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_acc: torch.Tensor | None, lse_acc: torch.Tensor | None,
    *, causal: bool = False, scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    window: tuple[int, int] | None = None, softcap: float | None = None, q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against this K/V block merged into the running ``(out_acc, lse_acc)`` inside the kernel
    epilogue. Returns new ``(out float32, lse float32)`` in q's layout with v's head dim (padded, or packed with
    cu_seqlens and the optional ``max_seqlen_*`` hints); ``out_acc=None`` starts from this block. The options
    as ``triton_attention_forward``. The inputs are not modified."""
    if (out_acc is None) != (lse_acc is None):
        raise ValueError("lse_acc: pass both out_acc and lse_acc, or neither")
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, _scale(q, scale), out_acc, lse_acc, max_seqlen_q,
                    max_seqlen_k, softcap=softcap, window=window, q_positions=q_positions, k_positions=k_positions)


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    """By name: CUDA, or CPU tensors when the kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return dtype in SUPPORTED_DTYPES and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


def _auto_eligible(device: torch.device, dtype: torch.dtype) -> bool:
    """For ``backend="auto"``: only where the kernels are the fast choice (compiled, on CUDA)."""
    return dtype in SUPPORTED_DTYPES and device.type == "cuda" and not INTERPRETED


def _backend_forward(q, k, v, *, causal, scale, **options):
    return _forward(q, k, v, None, None, causal, scale, **options)


def _backend_backward(dout, q, k, v, out, lse, *, causal, scale, **options):
    return _backward(dout, q, k, v, out, lse, None, None, causal, scale, **options)


def _backend_forward_varlen(q, k, v, cu_q, cu_k, *, causal, scale, max_seqlen_q=None, max_seqlen_k=None, **options):
    return _forward(q, k, v, cu_q, cu_k, causal, scale, None, None, max_seqlen_q, max_seqlen_k, **options)


def _backend_backward_varlen(dout, q, k, v, out, lse, cu_q, cu_k, *, causal, scale, max_seqlen_q=None,
                             max_seqlen_k=None, **options):
    return _backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, max_seqlen_q, max_seqlen_k, **options)


def register() -> None:
    """Register the ``"triton"`` attention backend (CUDA; CPU under TRITON_INTERPRET=1; "auto" on CUDA only)
    and its fused merge."""
    from seqpar.kernels.attention import FEATURES, AttentionBackend, register_attention_backend
    from seqpar.kernels.fused_merge import register_fused_merge

    register_attention_backend(
        AttentionBackend(
            name="triton", forward=_backend_forward, backward=_backend_backward, supports=_supports,
            forward_varlen=_backend_forward_varlen, backward_varlen=_backend_backward_varlen,
            auto_eligible=_auto_eligible,
            features=frozenset(FEATURES),  # window, softcap, positions, value head dim: all in the kernels
        )
    )
    register_fused_merge("triton", triton_attention_merge)

