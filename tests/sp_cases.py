"""Rank-side checks shared by the softmax SP op tests: build global inputs from a seed on every rank, run the
float64 single-device reference on the unsharded tensors, shard everything, run the op, compare."""

from __future__ import annotations

import torch
import torch.distributed as dist
from tests.checks import rel_err

import seqpar.collectives as collectives
from seqpar.collectives import count_comm
from seqpar.collectives.layout import shard_sequence
from seqpar.kernels.reference import reference_attention


def softmax_op(name: str):
    return getattr(collectives, name)


def global_inputs(seed, *, batch, seq_len, h, h_kv, d, lens=None, dv=None):
    """q, k, v, dout and the global cu_seqlens (None: padded); ``dv``: v's (and out's) head dim, default d."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    if lens is None:
        bs = (batch, seq_len)
        shapes = [(*bs, h, d), (*bs, h_kv, d), (*bs, h_kv, dv), (*bs, h, dv)]
        cu = None
    else:
        total = sum(lens)
        shapes = [(total, h, d), (total, h_kv, d), (total, h_kv, dv), (total, h, dv)]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, dout = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    return q, k, v, dout, cu


def check_against_reference(
    op_name, *, seed=0, batch=1, seq_len=None, lens=None, h=4, h_kv=2, d=32, causal=True, layout="zigzag",
    dtype=torch.float32, scale=None, dv=None, window=None, softcap=None, sinks=False, hint=False, op_options=None,
):
    """Return {'out': err, 'dq': err, 'dk': err, 'dv': err} for this rank's shard. ``dv``: v's head dim;
    ``window``/``softcap``: passed to the op and the reference; ``sinks``: random (H,) sink logits, whose
    gradient comes back as this rank's share (``d_sinks``, float64) with the reference's (``ref_d_sinks``);
    ``hint``: pass packed input's max_seqlen hint."""
    q, k, v, dout, cu = global_inputs(seed, batch=batch, seq_len=seq_len, h=h, h_kv=h_kv, d=d, lens=lens, dv=dv)
    sink_logits = torch.randn(h, generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)] + ([sink_logits.clone().requires_grad_()]
                                                                      if sinks else [])
    ref_out, _ = reference_attention(
        *leaves[:3], causal=causal, scale=scale, cu_seqlens=cu, window=window, softcap=softcap,
        sinks=leaves[3] if sinks else None,
    )
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)

    def shard(t):
        return shard_sequence(t, layout=layout) if cu is None else shard_sequence(t, layout=layout, cu_seqlens=cu)[0]

    local_cu = None if cu is None else shard_sequence(q, layout=layout, cu_seqlens=cu)[1]
    ql, kl, vl = (shard(t).to(dtype).requires_grad_(True) for t in (q, k, v))
    extra = dict(op_options or {})
    if window is not None:
        extra["window"] = window
    if softcap is not None:
        extra["softcap"] = softcap
    local_sinks = sink_logits.to(dtype).requires_grad_(True) if sinks else None
    if sinks:
        extra["sinks"] = local_sinks
    if hint and local_cu is not None:
        extra["max_seqlen"] = int(torch.diff(local_cu).max())
    out = softmax_op(op_name)(ql, kl, vl, causal=causal, softmax_scale=scale, layout=layout, cu_seqlens=local_cu,
                              **extra)
    out.backward(shard(dout).to(dtype))
    result = {"out": rel_err(out, shard(ref_out))}
    if sinks:
        result["d_sinks"] = local_sinks.grad.double()
        result["ref_d_sinks"] = ref_grads[3]
    # squared error and squared reference norms, so a test can also form the error over the whole tensor
    result["sq"] = {"out": _squares(out, shard(ref_out))}
    for name, got, ref in zip(("dq", "dk", "dv"), (ql.grad, kl.grad, vl.grad), ref_grads):
        result[name] = rel_err(got, shard(ref))
        result["sq"][name] = _squares(got, shard(ref))
    result["dtype_ok"] = out.dtype == dtype and ql.grad.dtype == dtype
    result["finite"] = all(bool(torch.isfinite(t).all()) for t in (out, ql.grad, kl.grad, vl.grad))
    return result


def _squares(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float(((got - ref) ** 2).sum()), float((ref**2).sum()), ref.numel()


def global_rel_err(results, name, *, floor_per_element=0.0):
    """Relative error of tensor ``name`` over all ranks' shards together (the whole unsharded tensor).

    ``floor_per_element``: the reference norm is taken as at least this times sqrt(numel), for tensors whose
    true value can be exactly zero (dq of a one-token sequence: the softmax over one key has no gradient)."""
    err = sum(r["sq"][name][0] for r in results)
    ref = sum(r["sq"][name][1] for r in results)
    numel = sum(r["sq"][name][2] for r in results)
    return (err / max(ref, floor_per_element**2 * numel)) ** 0.5


def measure_bytes(op_name, *, seq_len, h, h_kv, d, layout="zigzag", causal=True, dtype=torch.float32):
    """Bytes this rank sends in forward and in backward, and the per-op call counts."""
    size = dist.get_world_size()
    q, k, v, dout, _ = global_inputs(1, batch=2, seq_len=seq_len, h=h, h_kv=h_kv, d=d)
    ql, kl, vl = (shard_sequence(t, layout=layout).to(dtype).requires_grad_(True) for t in (q, k, v))
    with count_comm() as fwd:
        out = softmax_op(op_name)(ql, kl, vl, causal=causal, layout=layout)
    with count_comm() as bwd:
        out.backward(shard_sequence(dout, layout=layout).to(dtype))
    return {
        "fwd": fwd.bytes_sent, "bwd": bwd.bytes_sent, "fwd_calls": fwd.calls, "bwd_calls": bwd.calls,
        "fwd_direction": fwd.bytes_by_direction, "bwd_direction": bwd.bytes_by_direction,
        "local_tokens": ql.shape[0] * ql.shape[1], "world_size": size,
    }


def matrix_configs(op_name: str, world_size: int) -> list[dict]:
    """A covering set of cases for one op at one world size: causal x layout, GQA ratios, head dims, varlen,
    bfloat16. Ulysses needs H % P == 0, so its head counts follow P (H=6 at P=3 also exercises uneven GQA)."""
    p = world_size
    h = 6 if (op_name == "ulysses_attention" and p == 3) else 8
    cases = []
    for causal in (True, False):
        for layout in ("zigzag", "contiguous"):
            cases.append(dict(batch=2, seq_len=2 * p * 3, h=h, h_kv=2, d=32, causal=causal, layout=layout))
    cases.append(dict(batch=1, seq_len=2 * p * 4, h=h, h_kv=1, d=64, causal=True, layout="zigzag"))
    cases.append(dict(batch=1, seq_len=2 * p * 2, h=h, h_kv=h, d=128, causal=False, layout="zigzag"))
    cases.append(dict(lens=[2 * p * m for m in (1, 3, 2, 5, 1)], h=h, h_kv=2, d=32, causal=True, layout="zigzag"))
    cases.append(dict(lens=[p * m for m in (2, 1, 4, 3, 1)], h=h, h_kv=1, d=32, causal=True, layout="contiguous"))
    cases.append(
        dict(batch=1, seq_len=2 * p * 4, h=h, h_kv=2, d=32, causal=True, layout="zigzag", dtype=torch.bfloat16)
    )
    return cases


def check_matrix(op_name: str, seed: int = 0) -> list[tuple[dict, dict]]:
    size = dist.get_world_size()
    cases = matrix_configs(op_name, size)
    return [(case, check_against_reference(op_name, seed=seed + i, **case)) for i, case in enumerate(cases)]
