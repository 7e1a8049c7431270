"""seqpar against its peers, side by side in one process group: time, bytes and peak memory per rank.

    python bench/peers.py [--smoke] [--world-sizes 2 4] [--seq-lens 2048 8192] [--dtypes float32 float64]
                          [--repeats 5] [--peers NAME ...] [--no-save]

Peers (each only where it imports; ``pip install -e ".[peers]"``, see bench/README.md):

==========================  ======================================================  =======================
peer                        what runs                                              seqpar op it meets
==========================  ======================================================  =======================
``deepspeed_ulysses``       ``deepspeed.sequence.layer.DistributedAttention`` with  ``ulysses_attention``,
                            ``F.scaled_dot_product_attention`` as local attention   contiguous layout
``yunchang_ulysses``        ``yunchang.UlyssesAttention`` (flash-attn path)          ``ulysses_attention``,
                                                                                    contiguous layout
``ring_flash_attn_zigzag``  ``ring_flash_attn.zigzag_ring_flash_attn_func``         ``ring_attention``, zigzag
``torch_cp_ring``           torch's private ``_templated_ring_attention`` (+ its     ``ring_attention``, zigzag
                            backward) with the CPU flash kernel; load balance on,
                            the default all-gather rotation
``yunchang_usp``            ``yunchang.LongContextAttention`` (USP: Ulysses in       ``usp_attention``, zigzag,
                            consecutive pairs x its zigzag ring across them), its   ``ulysses_degree=2``
                            own token placement (``zigzag_extract_local``); W >= 4
==========================  ======================================================  =======================

Every configuration (world size W, sequence length S, dtype; causal, B=1, H=8, D=64, forward+backward) runs on
W gloo ranks (one thread each), every implementation on identical inputs; timed repeats are interleaved
(peer, seqpar, kernel, kernel, seqpar, peer, ...) after the untimed calls (checks, bytes, profile: the warm-up;
on CUDA one more round), each starts after a barrier and counts the slowest rank;
the table shows medians and the ratio peer / seqpar (> 1: seqpar is faster).

The kernel underneath: flash-attn has no CPU build, so where a peer calls flash-attn the bench process installs
a stand-in ``flash_attn`` module (only when the real one does not import) whose ``_flash_attn_forward`` /
``_flash_attn_backward`` / ``flash_attn_func`` run aten's CPU flash kernel with LSE
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), on strided views without copies. seqpar
runs its ``torch`` backend, which calls the same aten kernel; DeepSpeed runs SDPA, which dispatches to it too.
So every implementation spends the same kernel time and the ratio measures the SP layer. (The stand-in writes
the backward into flash-attn's out-arguments with one copy, which the CUDA kernel does not need.)

Checks: every output and gradient (dq, dk, dv of the local shard) against a float64 reference of the whole
sequence computed once per S by the definition (``seqpar.kernels.reference.reference_attention``, one head at a
time so the S x S scores fit), relative error ||got - ref|| / ||ref|| (the contract: 1e-5 outputs, 1e-4
gradients); a failed check is shown in the table, the time is still measured.

Bytes per rank: counted by wrapping torch.distributed's send and collective entry points (and the functional
collectives torch CP rotates with) during one untimed call, for every implementation alike; a collective is
charged what this rank sends in the nccl-tests convention seqpar uses (all-gather: input x (P-1), all-to-all:
the pieces for other ranks, reduce-scatter: input x (P-1)/P). seqpar's own ``count_comm`` is recorded too.

The work behind the time, which the machine's load does not change (CPU): ``aten ops`` (operator calls of one
forward+backward, nested ones included), ``allocated MB`` (every allocation's bytes, summed: copies, receive
buffers, temporaries) and ``copies`` / ``copied MB`` (the data-moving aten calls, ``COPY_OPS``, and the bytes they
wrote; the step's three input clones, 3 shards, are in every side's count), from the same profiled step as the peak.

The ceiling: every row also times ``kernel``, the kernel work alone that the op must do on a rank at those shapes
(``kernel_calls``: Ulysses one causal forward+backward on [S, H/W]; the zigzag ring the diagonal block and the
half blocks of one rank's steps; USP the ring's calls on H/u heads), aten's kernel called directly on
preallocated operands, no communication, no SP layer, no autograd, in the same interleaved rounds as the peer
and seqpar. ``ceiling peer/kernel`` = peer time / kernel time is the best time ratio
peer / seqpar that ANY SP layer over the same kernel could reach (one that cost nothing); ``peer overhead`` and
``seqpar overhead`` = time / kernel time - 1 are each SP layer's own cost. The ``cpu`` columns are the same
ratios of CPU seconds. Where the ceiling is below a target ratio, no SP layer reaches the target with this kernel.

Peak memory per rank: the CPU allocator's high-water mark during one forward+backward, read from
``torch.profiler(profile_memory=True)``: every allocation event carries the allocator's running total of the
bytes allocated (c10's ProfiledCPUMemoryReporter), so the peak minus the total just before the step is exact at
allocator level: everything torch allocates in the step (receive buffers, accumulators, saved tensors, the
returned gradients), nothing allocated before it (the shared inputs). tracemalloc sees no torch memory, and RSS
depends on glibc's free lists and mmap thresholds, so neither is used. gloo's internal socket buffers are not
torch allocations and are not counted (for any implementation).

GPU (prepared, not yet run: ``--device cuda --dtypes bfloat16 --seq-lens 16384 65536 131072``, W GPUs on one
node): the ranks talk over an NCCL group, the peers call the real flash-attn (the stand-in is only installed
where flash-attn does not import), seqpar runs ``backend="auto"`` (flash-attn, else Triton), memory is
``torch.cuda.max_memory_allocated`` over the step, and every row adds TFLOP/s per GPU (causal forward+backward:
7 S^2 H D / W flops per rank). The float64 reference is computed on the CPU for S <= ``--reference-max-s``; past
it the peer is checked against seqpar's own result instead (the row says so).

Writes bench/results/peers.json (peers_gpu.json with --device cuda) and a plot (not with --smoke).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, print_table, run_ranks, save_results  # noqa: E402

HEADS, HEAD_DIM, BATCH = 8, 64, 1
TOLERANCE = {"out": 1e-5, "grad": 1e-4}  # relative errors of the SP ops' contract (docs/architecture.md)
TOLERANCE_16BIT = {"out": 2e-2, "grad": 5e-2}  # bfloat16 / float16 inputs (GPU runs)
PEER_NAMES = ("deepspeed_ulysses", "yunchang_ulysses", "ring_flash_attn_zigzag", "torch_cp_ring", "yunchang_usp")
SEQPAR_OP = {  # the seqpar op and layout each peer meets
    "deepspeed_ulysses": ("ulysses_attention", "contiguous"),
    "yunchang_ulysses": ("ulysses_attention", "contiguous"),
    "ring_flash_attn_zigzag": ("ring_attention", "zigzag"),
    "torch_cp_ring": ("ring_attention", "zigzag"),
    "yunchang_usp": ("usp_attention", "zigzag"),
}
USP_ULYSSES_DEGREE = 2  # USP's Ulysses degree (both sides); the ring degree is W / 2
SMOKE = {"world_sizes": [2, 4], "seq_lens": [256], "dtypes": ["float32", "float64"], "repeats": 1}
MIN_WORLD = {"yunchang_usp": 4}  # USP needs a Ulysses and a ring degree > 1 (--smoke runs W=4 for these only)


# ----------------------------------------------------------------------------------------------------
# The CPU stand-in for flash-attn's kernels
# ----------------------------------------------------------------------------------------------------


def _cpu_flash_forward(q, k, v, causal: bool, scale: float):
    """(B, S, H, D) views -> out (B, Sq, H, D) (a view of contiguous memory), lse (B, H, Sq)."""
    if causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError("CPU stand-in: causal blocks with Sq != Sk are not used by the peers measured")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
    )
    return out.transpose(1, 2), lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    t = lambda x: x.transpose(1, 2)  # noqa: E731 -- the kernel honours every stride: no copies
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(dout), t(q), t(k), t(v), t(out), lse.to(acc), 0.0, causal, scale=scale
    )
    return [t(g) for g in grads]


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
    """flash-attn 2.8's ``_flash_attn_forward`` signature: returns (out, lse, S_dmask, rng_state)."""
    _check_stand_in_options(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    out, lse = _cpu_flash_forward(q, k, v, causal, softmax_scale)
    return out, lse, None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, rng_state=None):
    """flash-attn 2.8's ``_flash_attn_backward``: writes dq, dk, dv into the given buffers."""
    _check_stand_in_options(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    g_q, g_k, g_v = _cpu_flash_backward(dout, q, k, v, out, softmax_lse, causal, softmax_scale)
    for buf, g in ((dq, g_q), (dk, g_k), (dv, g_v)):
        buf.copy_(g)
    return None


def _check_stand_in_options(dropout_p, left, right, softcap, alibi_slopes) -> None:
    if dropout_p or left != -1 or right != -1 or softcap or alibi_slopes is not None:
        raise NotImplementedError("CPU stand-in: no dropout, window, softcap or alibi")


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = _cpu_flash_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_cpu_flash_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale), None, None)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _check_stand_in_options(dropout_p, *window_size, softcap, alibi_slopes)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _FlashAttnFunc.apply(q, k, v, causal, scale)


def _not_in_stand_in(*args, **kwargs):
    raise NotImplementedError("CPU stand-in for flash-attn: only the padded kernels are provided")


def install_flash_stand_in() -> str:
    """Make ``import flash_attn`` give the CPU stand-in when the real package does not import. Returns what
    ``flash_attn`` is now ("real flash-attn X" or "CPU stand-in")."""
    try:
        import flash_attn

        if not getattr(flash_attn, "_seqpar_cpu_stand_in", False):
            return f"real flash-attn {flash_attn.__version__}"
        return "CPU stand-in"
    except ImportError:
        pass
    package = types.ModuleType("flash_attn")
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    package.__version__ = "2.8.3"  # the signatures above; peers pick their call convention from it
    package._seqpar_cpu_stand_in = True
    package.__path__ = []
    for module in (package, interface):
        module.flash_attn_func = flash_attn_func
    interface._flash_attn_forward = _flash_attn_forward
    interface._flash_attn_backward = _flash_attn_backward
    for name in ("_flash_attn_varlen_forward", "_flash_attn_varlen_backward", "flash_attn_varlen_func",
                 "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
                 "flash_attn_varlen_qkvpacked_func"):
        setattr(interface, name, _not_in_stand_in)
        setattr(package, name, _not_in_stand_in)
    package.flash_attn_interface = interface
    sys.modules["flash_attn"] = package
    sys.modules["flash_attn.flash_attn_interface"] = interface
    return "CPU stand-in"


# ----------------------------------------------------------------------------------------------------
# Peers: each builds fn(q, k, v) -> out on this rank's (B, S_local, H, D) shard, or raises with the reason
# ----------------------------------------------------------------------------------------------------


def _deepspeed_ulysses(group, scale):
    import deepspeed.comm
    from deepspeed.sequence.layer import DistributedAttention

    # its CPU shared-memory all-reduce is a JIT C++ build (minutes) that Ulysses never uses: ops stay off.
    # (deepspeed.comm re-exports PyTorch as ``torch``, so the backend module is reached through sys.modules.)
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.comm.init_distributed(dist_backend="gloo", dist_init_required=False, verbose=False)  # wraps ours

    def local_attention(q, k, v, *args, **kwargs):  # (B, S, H/P, D) in and out
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
        )
        return out.transpose(1, 2)

    layer = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)
    return lambda q, k, v: layer(q, k, v, 0)


def _yunchang_ulysses(group, scale):
    from yunchang import UlyssesAttention
    from yunchang.kernels import AttnType

    layer = UlyssesAttention(group, scatter_idx=2, gather_idx=1, attn_type=AttnType.FA)
    return lambda q, k, v: layer(q, k, v, softmax_scale=scale, causal=True)


def _ring_flash_attn_zigzag(group, scale):
    _import_ring_flash_attn()
    from ring_flash_attn import zigzag_ring_flash_attn_func

    return lambda q, k, v: zigzag_ring_flash_attn_func(q, k, v, softmax_scale=scale, causal=True, group=group)


def _torch_cp_ring(group, scale):
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    if not hasattr(cp, "_templated_ring_attention") or not cp._cp_options.enable_load_balance:
        raise RuntimeError("torch CP: _templated_ring_attention with load balance is gone from this torch")

    def forward_op(q, k, v, is_causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        return out, lse

    def backward_op(query, key, value, out, logsumexp, is_causal, grad_out, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp.to(query.dtype), 0.0, is_causal, scale=scale
        )

    class RingFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # (B, H, S, D)
            out, lse = cp._templated_ring_attention(group, 2, forward_op, q, k, v, is_causal=True, scale=scale)
            out = out.to(q.dtype)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = cp._templated_ring_attention_backward(
                group, 2, backward_op, dout, "grad_out", q, k, v, out, lse, is_causal=True, scale=scale
            )
            return dq, dk, dv

    return lambda q, k, v: RingFunc.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _yunchang_usp(group, scale):
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    world = dist.get_world_size(group)
    if world < 2 * USP_ULYSSES_DEGREE:
        raise RuntimeError(f"USP needs a Ulysses and a ring degree > 1, so W >= {2 * USP_ULYSSES_DEGREE}: at W={world} "
                           "it is Ulysses or ring alone (the rows above)")
    if group is not dist.group.WORLD:
        raise RuntimeError("yunchang's USP builds its groups from the world (set_seq_parallel_pg)")
    # Ulysses inside consecutive ranks, ring across them: seqpar's usp_attention places its groups the same way
    set_seq_parallel_pg(USP_ULYSSES_DEGREE, world // USP_ULYSSES_DEGREE, dist.get_rank(), world,
                        use_ulysses_low=True)
    layer = LongContextAttention(ring_impl_type="zigzag", attn_type=AttnType.FA)
    return lambda q, k, v: layer(q, k, v, softmax_scale=scale, causal=True)


def _yunchang_usp_shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """yunchang's own token placement for USP with the zigzag ring (its ``zigzag_extract_local``): the ring rank's
    zigzag pair of 2R chunks, cut contiguously among the Ulysses ranks. (seqpar's usp keeps the 1-D zigzag
    placement of ``ring_attention`` instead; each side gets the same global inputs in its own placement.)"""
    u = USP_ULYSSES_DEGREE
    ring_degree, ring_rank, ulysses_rank = world // u, rank // u, rank % u
    chunks = t.chunk(2 * ring_degree, dim=1)
    pair = torch.cat([chunks[ring_rank], chunks[2 * ring_degree - 1 - ring_rank]], dim=1)
    return pair.chunk(u, dim=1)[ulysses_rank]


PEER_SHARD: dict[str, Callable] = {"yunchang_usp": _yunchang_usp_shard}  # peers that place tokens their own way


def _import_ring_flash_attn() -> None:
    """ring-flash-attn's package __init__ imports its Hugging Face adapter, which (ring-flash-attn 0.1.8) needs a
    helper transformers 5 removed; the ring functions do not use it. Where that import fails, stand in an empty
    ``ring_flash_attn.adapters`` and import again."""
    try:
        importlib.import_module("ring_flash_attn")
    except ImportError as err:
        if "transformers" not in str(err):
            raise
        for name in [m for m in sys.modules if m.startswith("ring_flash_attn")]:
            del sys.modules[name]
        adapters = types.ModuleType("ring_flash_attn.adapters")
        adapters.substitute_hf_flash_attn = adapters.update_ring_flash_attn_params = _not_in_stand_in
        sys.modules["ring_flash_attn.adapters"] = adapters
        importlib.import_module("ring_flash_attn")


PEER_BUILDERS: dict[str, Callable] = {
    "deepspeed_ulysses": _deepspeed_ulysses,
    "yunchang_ulysses": _yunchang_ulysses,
    "ring_flash_attn_zigzag": _ring_flash_attn_zigzag,
    "torch_cp_ring": _torch_cp_ring,
    "yunchang_usp": _yunchang_usp,
}


def _seqpar_op(name: str, layout: str, group, backend: str = "torch"):
    import seqpar.collectives as collectives

    op = getattr(collectives, name)
    extra = {"ulysses_degree": USP_ULYSSES_DEGREE} if name == "usp_attention" else {}
    return lambda q, k, v: op(q, k, v, group=group, causal=True, layout=layout, backend=backend, **extra)


def kernel_calls(op_name: str, seq_len: int, rank: int, world: int) -> list[tuple[int, int, int, bool]]:
    """``(Sq, Sk, heads, causal)`` of every attention kernel call one rank of ``op_name`` must make in a causal
    forward (the backward makes the same calls): Ulysses one causal call over the whole sequence on H/W heads; the
    zigzag ring (and USP's ring of degree W/u on H/u heads after its all-to-all) the diagonal block of its two
    chunks (2c x 2c, causal) and, per other ring rank, half a block (2c x c for the r ranks before it, c x 2c
    for the others, c = S / 2W): the split ring-flash-attn, torch CP's load balancing and seqpar make alike."""
    if op_name == "ulysses_attention":
        return [(seq_len, seq_len, HEADS // world, True)]
    heads, ring_world, ring_rank = HEADS, world, rank
    if op_name == "usp_attention":  # Ulysses inside consecutive ranks, the ring across them
        u = USP_ULYSSES_DEGREE
        heads, ring_world, ring_rank = HEADS // u, world // u, rank // u
    chunk = seq_len // (2 * ring_world)
    return ([(2 * chunk, 2 * chunk, heads, True)] + [(2 * chunk, chunk, heads, False)] * ring_rank
            + [(chunk, 2 * chunk, heads, False)] * (ring_world - 1 - ring_rank))


def kernel_alone(op_name: str, seq_len: int, rank: int, world: int, dtype: torch.dtype,
                 device: torch.device) -> Callable[[], None]:
    """A step that runs only the kernel work of ``kernel_calls`` on this rank: every call's forward, then every
    call's backward, on (B, S, H, D) operands passed as (B, H, S, D) views (what every implementation measured here
    hands its kernel), without communication, SP wrapper, autograd or input clones. On CPU that is aten's CPU flash
    kernel and its backward (the kernel under all of them); on CUDA seqpar's ``attention_block`` (flash-attn, else
    Triton). Its time is the floor of any SP layer over this kernel: peer time / kernel time is the best time ratio
    peer / seqpar that an SP layer with no cost at all could reach."""
    gen = torch.Generator().manual_seed(1000 + rank)
    operands = [[torch.randn(BATCH, sk if i in (1, 2) else sq, heads, HEAD_DIM, generator=gen).to(device, dtype)
                 for i in range(4)] + [causal] for sq, sk, heads, causal in kernel_calls(op_name, seq_len, rank, world)]
    scale = 1.0 / math.sqrt(HEAD_DIM)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    from seqpar.kernels.attention import attention_block, attention_block_backward

    def step() -> None:
        saved = []
        for q, k, v, dout, causal in operands:
            if device.type == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    t(q), t(k), t(v), 0.0, causal, scale=scale)[:2]
            else:
                out, lse = attention_block(q, k, v, causal=causal, scale=scale, backend="auto")
            saved.append((out, lse))
        for (q, k, v, dout, causal), (out, lse) in zip(operands, saved):
            if device.type == "cpu":
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    t(dout), t(q), t(k), t(v), out, lse.to(acc), 0.0, causal, scale=scale)
            else:
                attention_block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, backend="auto")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


# ----------------------------------------------------------------------------------------------------
# Measuring: bytes (a torch.distributed wrapper), peak memory (profiler), time (interleaved medians)
# ----------------------------------------------------------------------------------------------------


class _ByteCounter:
    """Count what this rank sends through torch.distributed while active (see the module docstring)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._saved: list[tuple[object, str, object]] = []

    def _patch(self, module, name: str, wrapper_of: Callable[[Callable], Callable]) -> None:
        original = getattr(module, name, None)
        if original is None:
            return
        self._saved.append((module, name, original))
        setattr(module, name, wrapper_of(original))

    def __enter__(self):
        c10d = dist.distributed_c10d
        size = lambda t: t.numel() * t.element_size()  # noqa: E731

        def world(group):
            return dist.get_world_size(group)

        def counting(charge):
            def wrap(original):
                def wrapper(*args, **kwargs):
                    self.bytes += int(charge(*args, **kwargs))
                    return original(*args, **kwargs)
                wrapper.__wrapped__ = original
                return wrapper
            return wrap

        send_charge = lambda tensor, *a, **kw: size(tensor)  # noqa: E731
        isend_wrapper = counting(send_charge)(c10d.isend)
        irecv_original = c10d.irecv
        # P2POp checks its op against c10d's own isend/irecv: patch both namespaces with the same objects
        for module in (dist, c10d):
            self._saved += [(module, "isend", getattr(module, "isend")), (module, "irecv", getattr(module, "irecv")),
                            (module, "send", getattr(module, "send"))]
            module.isend, module.irecv = isend_wrapper, irecv_original
            module.send = counting(send_charge)(c10d.send)

        def a2a_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            if not input_split_sizes:
                return size(input) * (world(group) - 1) // world(group)
            row = input.element_size() * (input.numel() // max(1, input.shape[0]))  # splits count dim-0 rows
            return (sum(input_split_sizes) - input_split_sizes[dist.get_rank(group)]) * row

        def a2a_list(outputs, inputs, group=None, **kw):
            r = dist.get_rank(group)
            return sum(size(t) for j, t in enumerate(inputs) if j != r)

        self._patch(dist, "all_to_all_single", counting(a2a_single))
        self._patch(dist, "all_to_all", counting(a2a_list))
        self._patch(dist, "all_gather_into_tensor",
                    counting(lambda out, inp, group=None, **kw: size(inp) * (world(group) - 1)))
        self._patch(dist, "all_gather", counting(lambda outs, inp, group=None, **kw: size(inp) * (world(group) - 1)))
        self._patch(dist, "reduce_scatter_tensor",
                    counting(lambda out, inp, op=None, group=None, **kw: size(inp) * (world(group) - 1)
                             // world(group)))
        self._patch(dist, "all_reduce",
                    counting(lambda t, op=None, group=None, **kw: 2 * size(t) * (world(group) - 1) // world(group)))
        from torch.distributed import _functional_collectives as funcol

        self._patch(funcol, "all_gather_single",
                    counting(lambda t, gather_dim=0, group=None, **kw: size(t) * (world(group) - 1)))
        self._patch(funcol, "all_gather_tensor",
                    counting(lambda t, gather_dim=0, group=None, **kw: size(t) * (world(group) - 1)))
        self._patch(funcol, "permute_tensor", counting(lambda t, src_dst, group=None, **kw: size(t)))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)


def peak_memory_bytes(step: Callable[[], object], device: torch.device | None = None) -> int:
    """The allocator's high-water mark of the bytes allocated during ``step()`` (see the module docstring)."""
    return step_profile(step, device)["peak"]


def step_profile(step: Callable[[], object], device: torch.device | None = None) -> dict[str, int]:
    """One ``step()`` under the profiler: ``peak`` (see ``peak_memory_bytes``) and, on CPU, the work that does not
    depend on the machine's load: ``allocated`` (the bytes of every allocation, summed: copies, receive buffers,
    temporaries), ``ops`` (aten operator calls, nested ones included), ``copies`` and ``copied`` (the calls of
    ``COPY_OPS`` and the bytes they wrote: ``copy_``'s destination, the outputs the others allocate)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return {"peak": int(torch.cuda.max_memory_allocated(device) - base)}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        step()
    allocation, torch_op = torch._C._profiler._EventType.Allocation, torch._C._profiler._EventType.TorchOp
    events, ops, copies, copied = [], 0, 0, 0
    stack = [(node, False) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, inside_copy = stack.pop()
        kind, fields = node.typed
        if kind == allocation:
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        elif kind == torch_op and node.name.startswith("aten::"):
            ops += 1
            if node.name in COPY_OPS and not inside_copy:
                copies += 1
                copied += _bytes_written(node)
                inside_copy = True
        stack.extend((child, inside_copy) for child in node.children)
    if not events:
        return {"peak": 0, "allocated": 0, "ops": ops, "copies": copies, "copied": copied}
    events.sort()
    # the reporter's total persists across profiling sessions (memory allocated while an earlier one ran and
    # still alive, e.g. a peer's cached buffers, stays in it): measure from the total just before this step
    baseline = events[0][2] - events[0][1]
    return {"peak": int(max(total for _, _, total in events) - baseline),
            "allocated": sum(size for _, size, _ in events if size > 0), "ops": ops, "copies": copies,
            "copied": copied}


# aten ops that only move data (counted once where one calls another, e.g. contiguous -> clone -> copy_); the
# kernels' own zero fills and the reductions are not copies
COPY_OPS = frozenset({"aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::gather",
                      "aten::stack"})


def _bytes_written(node) -> int:
    """Bytes a ``COPY_OPS`` call wrote: ``copy_``'s destination, else what it allocated (its output)."""
    if node.name == "aten::copy_":
        dst = node.typed[1].inputs[0]
        return int(math.prod(dst.sizes)) * torch.tensor([], dtype=dst.dtype).element_size()
    total, stack = 0, list(node.children)
    allocation = torch._C._profiler._EventType.Allocation
    while stack:
        child = stack.pop()
        kind, fields = child.typed
        if kind == allocation and fields.alloc_size > 0:
            total += fields.alloc_size
        stack.extend(child.children)
    return total


def reference_path(seq_len: int) -> Path:
    return Path(tempfile.gettempdir()) / f"seqpar_peers_reference_S{seq_len}_H{HEADS}_D{HEAD_DIM}.pt"


def global_inputs(seq_len: int) -> list[torch.Tensor]:
    """q, k, v, dout of the whole sequence in float64 (the same on every rank and in the parent)."""
    gen = torch.Generator().manual_seed(seq_len)
    return [torch.randn(BATCH, seq_len, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(4)]


def make_reference(seq_len: int) -> Path:
    """out, dq, dk, dv of the whole sequence by the definition, in float64, one head at a time (saved, reused)."""
    from seqpar.kernels.reference import reference_attention

    path = reference_path(seq_len)
    if path.is_file():
        return path
    q, k, v, dout = global_inputs(seq_len)
    results = [torch.empty_like(q) for _ in range(4)]
    for h in range(HEADS):
        leaves = [t[:, :, h:h + 1].clone().requires_grad_(True) for t in (q, k, v)]
        out, _ = reference_attention(*leaves, causal=True)
        out.backward(dout[:, :, h:h + 1])
        for i, t in enumerate([out, *(leaf.grad for leaf in leaves)]):
            results[i][:, :, h:h + 1] = t.detach()
        del out, leaves
    torch.save(results, path)
    return path


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def measure(config: dict) -> list[dict]:
    """On every rank: all (S, dtype, peer) combinations of ``config`` at this world size; rank 0's rows."""
    stand_in = install_flash_stand_in()
    from seqpar.collectives import comm
    from seqpar.collectives.layout import shard_sequence

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(config.get("device", "cpu"))
    group, backend = dist.group.WORLD, "torch"
    if device.type == "cuda":  # one GPU per rank, the data on an NCCL group (the default group stays gloo)
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        group, backend = dist.new_group(backend="nccl"), "auto"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    scale = 1.0 / math.sqrt(HEAD_DIM)
    rows = []
    for seq_len in config["seq_lens"]:
        inputs64 = global_inputs(seq_len)
        path = reference_path(seq_len)
        reference = torch.load(path) if path.is_file() else None  # None: checked against seqpar instead
        for dtype_name in config["dtypes"]:
            dtype = getattr(torch, dtype_name)
            tolerance = TOLERANCE if dtype in (torch.float32, torch.float64) else TOLERANCE_16BIT
            # seqpar's untimed calls (checks, bytes, profile) depend only on its op: made once per (S, dtype) and
            # shared by the rows of the peers that meet the same op (its timed calls run in every row)
            seqpar_untimed: dict[tuple[str, str], tuple[dict, list]] = {}
            for peer in config["peers"]:
                op_name, layout = SEQPAR_OP[peer]
                row = {"peer": peer, "seqpar_op": f"{op_name} ({layout})", "W": world, "S": seq_len,
                       "dtype": dtype_name, "kernel": stand_in, "device": device.type}
                try:
                    peer_fn = PEER_BUILDERS[peer](group, scale)
                    error = None
                except Exception as err:  # noqa: BLE001 -- the reason goes into the table
                    peer_fn, error = None, f"{type(err).__name__}: {err}".splitlines()[0][:200]
                errors = [None] * world
                dist.all_gather_object(errors, error)
                if any(errors):
                    row["status"] = f"cannot run: {next(e for e in errors if e)}"
                    rows.append(row)
                    continue
                seqpar_shard = lambda t: shard_sequence(t, group=group, layout=layout)  # noqa: E731
                peer_shard = ((lambda t: PEER_SHARD[peer](t, rank, world)) if peer in PEER_SHARD  # noqa: E731
                              else seqpar_shard)
                shards = {"seqpar": seqpar_shard, "peer": peer_shard}
                local = {name: [shard(t).to(device=device, dtype=dtype).contiguous() for t in inputs64]
                         for name, shard in shards.items()}
                local_ref = None if reference is None else {name: [shard(t) for t in reference]
                                                            for name, shard in shards.items()}
                impls = {"peer": peer_fn, "seqpar": _seqpar_op(op_name, layout, group, backend)}

                def step(fn, keep=False):
                    inputs = local["peer" if fn is peer_fn else "seqpar"]
                    leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
                    out = fn(*leaves)
                    out.backward(inputs[3])
                    sync()
                    return [t.detach().cpu() for t in (out, *(leaf.grad for leaf in leaves))] if keep else None

                try:
                    results = {}
                    for name in ("seqpar", "peer"):  # correctness and bytes, then memory: untimed calls
                        if name == "seqpar" and (op_name, layout) in seqpar_untimed:
                            fields, results[name] = seqpar_untimed[op_name, layout]
                            row.update(fields)
                            continue
                        fn = impls[name]
                        with _ByteCounter() as counter, comm.count_comm() as stats:
                            results[name] = step(fn, keep=True)
                        # past --reference-max-s the peer is checked against seqpar (whose own error is unknown)
                        ref = local_ref[name] if local_ref is not None else (
                            results["seqpar"] if name == "peer" and peer not in PEER_SHARD else None)
                        if ref is not None:
                            errs = [_rel_err(g, r) for g, r in zip(results[name], ref)]
                            row[f"{name} out err"] = max_over_ranks(errs[0])
                            row[f"{name} grad err"] = max_over_ranks(max(errs[1:]))
                        row[f"{name} MB"] = max_over_ranks(counter.bytes) / 1e6
                        if name == "seqpar":
                            row["seqpar count_comm MB"] = max_over_ranks(stats.bytes_sent) / 1e6
                        dist.barrier()
                        profiled = step_profile(lambda: step(fn), device)
                        row[f"{name} peak MiB"] = max_over_ranks(profiled["peak"]) / 2**20
                        if "ops" in profiled:  # the work behind the time, which load does not change
                            row[f"{name} allocated MB"] = max_over_ranks(profiled["allocated"]) / 1e6
                            row[f"{name} aten ops"] = int(max_over_ranks(profiled["ops"]))
                            row[f"{name} copies"] = int(max_over_ranks(profiled["copies"]))
                            row[f"{name} copied MB"] = max_over_ranks(profiled["copied"]) / 1e6
                        if name == "seqpar":
                            fields = {k: v for k, v in row.items() if k.startswith("seqpar ")}
                            seqpar_untimed[op_name, layout] = fields, results[name]
                    del results
                    # the kernel work alone (kernel_alone), timed in the same interleaved rounds as the two ops
                    timed = {"peer": lambda: step(peer_fn), "seqpar": lambda: step(impls["seqpar"]),
                             "kernel": kernel_alone(op_name, seq_len, rank, world, dtype, device)}
                    times, cpu_times = {name: [] for name in timed}, {name: [] for name in timed}
                    order = list(timed)
                    # a warm-up round on CUDA; on CPU the untimed calls above warmed peer and seqpar up, on the
                    # kernel that kernel_alone calls
                    warm_up = int(device.type == "cuda")
                    for rep in range(config["repeats"] + warm_up):
                        for name in order if rep % 2 == 0 else order[::-1]:
                            dist.barrier()
                            sync()
                            start, cpu_start = time.perf_counter(), time.process_time()
                            timed[name]()  # synchronizes the device before it returns
                            elapsed = max_over_ranks(time.perf_counter() - start)
                            cpu = max_over_ranks(time.process_time() - cpu_start)
                            if rep >= warm_up:
                                times[name].append(elapsed)
                                cpu_times[name].append(cpu)
                    del timed
                    for name in times:
                        row[f"{name} s"] = statistics.median(times[name])
                        row[f"{name} s spread"] = (max(times[name]) - min(times[name])) / row[f"{name} s"]
                        row[f"{name} cpu s"] = statistics.median(cpu_times[name])
                    row["time peer/seqpar"] = row["peer s"] / row["seqpar s"]
                    # CPU seconds of the step (the busiest rank's process, all its threads): what a loaded machine
                    # does not stretch by making the ranks wait for a core; equal to the time on an idle one
                    row["cpu peer/seqpar"] = row["peer cpu s"] / row["seqpar cpu s"]
                    # the ceiling: the best time ratio peer / seqpar any SP layer over this kernel could reach
                    # (one that cost nothing), and each side's SP overhead over the kernel work alone
                    for unit in ("s", "cpu s"):
                        prefix = "" if unit == "s" else "cpu "
                        row[f"{prefix}ceiling peer/kernel"] = row[f"peer {unit}"] / row[f"kernel {unit}"]
                        for name in impls:
                            row[f"{name} {prefix}overhead"] = row[f"{name} {unit}"] / row[f"kernel {unit}"] - 1
                    row["peak peer/seqpar"] = row["peer peak MiB"] / row["seqpar peak MiB"]
                    if device.type == "cuda":  # causal forward+backward: 7 S^2 H D flops, W GPUs
                        flops = 7 * seq_len**2 * HEADS * HEAD_DIM * BATCH / world
                        for name in impls:
                            row[f"{name} TFLOP/s per GPU"] = flops / row[f"{name} s"] / 1e12
                    checked = [n for n in ("peer", "seqpar") if f"{n} out err" in row]
                    bad = [f"{n} {kind} err {row[f'{n} {kind} err']:.1e}" for n in checked for kind in ("out", "grad")
                           if row[f"{n} {kind} err"] > tolerance[kind]]
                    row["status"] = ("check failed: " + ", ".join(bad) if bad else "ok") + (
                        "" if local_ref is not None else " (no float64 reference at this S: peer vs seqpar)")
                except Exception as err:  # noqa: BLE001 -- a peer that fails mid-run: the reason into the table
                    row["status"] = f"failed: {type(err).__name__}: {err}".splitlines()[0][:200]
                    if os.environ.get("SEQPAR_PEERS_TRACEBACK"):
                        traceback.print_exc()
                rows.append(row)
                if rank == 0:
                    shown = ("time peer/seqpar", "ceiling peer/kernel", "cpu peer/seqpar", "cpu ceiling peer/kernel",
                             "peak peer/seqpar")
                    ratios = "".join(f", {key} {row[key]:.3f}" for key in shown
                                     if key in row)
                    print(f"  W={world} S={seq_len} {dtype_name} {peer}: {row['status']}{ratios}", flush=True)
    return rows


def max_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def available_peers() -> dict[str, str | None]:
    """Which peers import here: name -> None, or the reason one does not (checked in this process)."""
    install_flash_stand_in()
    modules = {"deepspeed_ulysses": "deepspeed.sequence.layer", "yunchang_ulysses": "yunchang",
               "ring_flash_attn_zigzag": "ring_flash_attn",
               "torch_cp_ring": "torch.distributed.tensor.experimental._context_parallel._attention",
               "yunchang_usp": "yunchang"}
    reasons = {}
    for peer, module in modules.items():
        try:
            _import_ring_flash_attn() if peer == "ring_flash_attn_zigzag" else importlib.import_module(module)
            reasons[peer] = None
        except Exception as err:  # noqa: BLE001 -- an import that fails for any reason means: not installed here
            reasons[peer] = f"{module} does not import: {type(err).__name__}: {err}".splitlines()[0][:200]
    return reasons


COLUMNS = ["peer", "W", "S", "dtype", "time peer/seqpar", "ceiling peer/kernel", "peer s", "seqpar s", "kernel s",
           "peer overhead", "seqpar overhead", "cpu peer/seqpar", "cpu ceiling peer/kernel", "peer MB", "seqpar MB",
           "peer peak MiB", "seqpar peak MiB", "peer allocated MB", "seqpar allocated MB", "peer copies",
           "seqpar copies", "peer copied MB", "seqpar copied MB", "peer aten ops", "seqpar aten ops", "peer grad err",
           "seqpar grad err", "status"]


def run(world_sizes, seq_lens, dtypes, repeats, peers, device="cpu", reference_max_s=None,
        smoke: bool = False) -> tuple[list[dict], dict]:
    """Every peer at every world size (``smoke``: W=2, and W=4 only for the peers that need it)."""
    reasons = available_peers()
    for peer, reason in reasons.items():
        if peer in peers and reason:
            print(f"skipping {peer}: {reason}", flush=True)
    runnable = [p for p in peers if not reasons[p]]
    rows = [{"peer": p, "status": f"not installed: {reasons[p]}"} for p in peers if reasons[p]]
    for seq_len in seq_lens:
        if reference_max_s is None or seq_len <= reference_max_s:
            make_reference(seq_len)
    for world in world_sizes:
        at_world = [p for p in runnable
                    if world >= MIN_WORLD.get(p, 0) and (not smoke or world == 2 or p in MIN_WORLD)]
        if not smoke:
            rows += [{"peer": p, "W": world, "status": f"cannot run: {p} needs W >= {MIN_WORLD[p]} (at W={world} USP "
                      "is Ulysses or ring alone: the rows above)"} for p in runnable if world < MIN_WORLD.get(p, 0)]
        if at_world:
            config = {"seq_lens": seq_lens, "dtypes": dtypes, "repeats": repeats, "peers": at_world,
                      "device": device}
            rows += run_ranks(measure, world, config)[0]
    return rows, reasons


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "time peer/seqpar" in r]
    if not done:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['peer']}\nW={r['W']} S={r['S']} {r['dtype'].replace('float', 'fp')}" for r in done]
    for ax, key, title in ((axes[0], "time peer/seqpar", "time peer / seqpar (>1: seqpar faster)"),
                           (axes[1], "peak peer/seqpar", "peak memory peer / seqpar (>1: seqpar leaner)")):
        ax.barh(range(len(done)), [r[key] for r in done], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(done)), labels if ax is axes[0] else [""] * len(done), fontsize=6)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="W=2 (W=4 for USP), S=256, float32 and float64, one repeat; writes no results "
                             "(see --rows-json)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                        choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank, NCCL")
    parser.add_argument("--reference-max-s", type=int, default=None,
                        help="compute the float64 reference only up to this S (default: always; 16384 on cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", nargs="+", default=list(PEER_NAMES), choices=PEER_NAMES)
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--rows-json", type=Path, help="also write the rows to this file (the smoke test reads it)")
    parser.add_argument("--append", action="store_true",
                        help="keep the recorded rows of bench/results/peers.json that this run does not re-measure")
    parser.add_argument("--note", default="", help="a line for the JSON (e.g. how loaded the machine was)")
    args = parser.parse_args()
    settings = dict(SMOKE) if args.smoke else {"world_sizes": args.world_sizes, "seq_lens": args.seq_lens,
                                               "dtypes": args.dtypes, "repeats": args.repeats}
    load_before, start_time = os.getloadavg(), time.time()
    reference_max_s = args.reference_max_s or (16384 if args.device == "cuda" else None)
    rows, reasons = run(settings["world_sizes"], settings["seq_lens"], settings["dtypes"], settings["repeats"],
                        args.peers, args.device, reference_max_s, smoke=args.smoke)
    name = "peers" if args.device == "cpu" else "peers_gpu"
    print("\nforward+backward, causal, B=1 H=8 D=64; medians of interleaved repeats; MB sent and peak MiB per rank")
    print_table(rows, COLUMNS)
    if args.rows_json:
        args.rows_json.write_text(json.dumps(rows, indent=1))
    if args.smoke or args.no_save:
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start_time))
    runs = [{"settings": settings, "started": started, "minutes": round((time.time() - start_time) / 60, 1),
             "load_average_before_after": [list(load_before), list(os.getloadavg())], "note": args.note}]
    for row in rows:  # which run measured a row (--append keeps older runs' rows: they say when)
        row["run started"] = started
    recorded = RESULTS / f"{name}.json"
    if args.append and recorded.is_file():  # rows of earlier runs that this one did not re-measure stay
        old = json.loads(recorded.read_text())
        key = lambda r: (r["peer"], r.get("W"), r.get("S"), r.get("dtype"))  # noqa: E731
        fresh = {key(r) for r in rows}
        rows = [r for r in old["rows"] if key(r) not in fresh] + rows
        runs = old["config"]["runs"] + runs
    config = {"heads": HEADS, "head_dim": HEAD_DIM, "batch": BATCH, "causal": True, "threads_per_rank": 1,
              "tolerance_rel_err": TOLERANCE, "runs": runs}
    path = save_results(name, {"config": config, "peers_not_installed": {p: r for p, r in reasons.items() if r},
                                  "rows": rows})
    plot(rows, RESULTS / f"{name}.png")
    print(f"\nwrote {path} and {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
