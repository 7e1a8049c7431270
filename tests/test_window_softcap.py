"""Sliding windows, softcap, attention sinks and a value head dim != q/k head dim (MLA) in the kernels and in
every softmax SP op, against the float64 single-device reference (kernels/reference.py: a naive masked
softmax), on real gloo ranks; and what ring / TokenRing send with a window (the hops saved)."""

import importlib

import pytest
import torch
import torch.distributed as dist
from tests.checks import value_errors
from tests.harness import run_distributed
from tests.sp_cases import check_against_reference, global_inputs, softmax_op

from seqpar import strategies
from seqpar.collectives import count_comm
from seqpar.collectives.layout import shard_indices, shard_sequence
from seqpar.kernels.attention import attention, attention_block, get_attention_backend
from seqpar.kernels.reference import reference_attention
from seqpar.strategies import LayerShape

OPS = ["ring_attention", "token_ring_attention", "ulysses_attention", "allgather_kv_attention", "usp_attention"]
WORLD_SIZES = [1, 2, 3, 4, 8]


# ----------------------------------------------------------------------------------------------------
# Kernels (torch backend) against the reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq", [5, 8])
def test_kernel_window_softcap_sinks_value_dim(causal, sq):
    """Every combination on one small shape: float64 to 1e-10, out and every gradient (sinks' included)."""
    gen = torch.Generator().manual_seed(sq)
    for window in (None, (0, 0), (2, 0), (3, 1), (-1, 2), (20, 20)):
        for softcap, sinks, dv in ((None, False, 24), (2.0, False, 16), (None, True, 32), (1.5, True, 16)):
            q = torch.randn(2, sq, 4, 24, generator=gen, dtype=torch.float64, requires_grad=True)
            k = torch.randn(2, 8, 2, 24, generator=gen, dtype=torch.float64, requires_grad=True)
            v = torch.randn(2, 8, 2, dv, generator=gen, dtype=torch.float64, requires_grad=True)
            leaves = [q, k, v] + ([torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)]
                                  if sinks else [])
            s = leaves[3] if sinks else None
            ref, _ = reference_attention(q, k, v, causal=causal, window=window, softcap=softcap, sinks=s)
            dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
            ref_grads = torch.autograd.grad(ref, leaves, dout)
            out = attention(q, k, v, causal=causal, window=window, softcap=softcap, sinks=s, backend="torch")
            grads = torch.autograd.grad(out, leaves, dout)
            case = (window, softcap, sinks, dv)
            assert out.shape == ref.shape and (out - ref).abs().max() < 1e-10, case
            for name, g, r in zip("q k v sinks".split(), grads, ref_grads):
                assert (g - r).abs().max() < 1e-10, (case, name)


def test_kernel_math_path_in_row_chunks(monkeypatch):
    """The math path bounds its memory by query-row chunks: with a chunk of 2 rows the results are the same."""
    kernels = importlib.import_module("seqpar.kernels.attention")  # the module (seqpar.kernels.attention is a function)
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 7, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 7, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    ref, _ = reference_attention(q, k, v, causal=True, window=(3, 0), softcap=2.0)
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [q, k, v], dout)
    monkeypatch.setattr(kernels, "_GENERAL_CHUNK_SCORES", 2 * 2 * 4 * 7)
    out = attention(q, k, v, causal=True, window=(3, 0), softcap=2.0, backend="torch")
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert (out - ref).abs().max() < 1e-12
    assert max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads)) < 1e-12


def test_kernel_positions_and_value_dim_on_the_fast_path():
    """Explicit positions mean what the reference's positions mean; v head dim != q/k on aten's flash path
    (no option: zero-padded head dims) in float32, with GQA and bottom-right causal alignment (Sq < Sk)."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 6, 4, 24, generator=gen, dtype=torch.float64), torch.randn(1, 9, 2, 24, generator=gen,
                                                                                   dtype=torch.float64)
    v = torch.randn(1, 9, 2, 16, generator=gen, dtype=torch.float64)
    qp, kp = torch.tensor([3, 4, 9, 10, 11, 20]), torch.tensor([0, 1, 2, 5, 8, 9, 10, 18, 19])
    ref, ref_lse = reference_attention(q, k, v, causal=True, window=(4, 0), q_positions=qp, k_positions=kp)
    out, lse = attention_block(q, k, v, causal=True, window=(4, 0), q_positions=qp[None], k_positions=kp[None],
                               backend="torch")
    assert (out - ref).abs().max() < 1e-12 and (lse - ref_lse).abs().max() < 1e-12
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*ref_leaves, causal=True)
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    out = attention(*leaves, causal=True, backend="torch")
    grads = torch.autograd.grad(out, leaves, dout.float())
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    assert (out.double() - ref).abs().max() < 1e-5
    assert max(float((g.double() - r).abs().max()) for g, r in zip(grads, ref_grads)) < 1e-4


def test_kernel_options_refused_where_unsupported(monkeypatch):
    """Bad options raise ValueError naming them; "auto" resolves to a backend that has every needed feature and
    a named backend without one refuses (a backend registered with no features)."""
    kernels = importlib.import_module("seqpar.kernels.attention")  # the module (seqpar.kernels.attention is a function)
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    errors = value_errors({
        "window": lambda: attention_block(q, k, v, window=(2,)),
        "window ": lambda: attention_block(q, k, v, window=(-2, 0)),
        "softcap": lambda: attention_block(q, k, v, softcap=-1.0),
        "sinks": lambda: attention(q, k, v, sinks=torch.zeros(3)),
    })
    assert all(message and message.startswith(name.strip() + ":") for name, message in errors.items()), errors
    for needs in (("window",), ("softcap",), ("positions",), ("value_head_dim",)):
        assert needs[0] in get_attention_backend("auto", q.device, q.dtype, needs=needs).features
    plain = kernels.AttentionBackend(name="plain", forward=kernels._torch_forward, backward=kernels._torch_backward,
                                     supports=lambda device, dtype: True)
    monkeypatch.setitem(kernels._BACKENDS, "plain", plain)
    with pytest.raises(ValueError, match="backend: 'plain' cannot do window"):
        get_attention_backend("plain", torch.device("cuda"), torch.bfloat16, needs=("window",))


# ----------------------------------------------------------------------------------------------------
# SP ops against the reference
# ----------------------------------------------------------------------------------------------------


def window_cases(op_name: str, p: int) -> list[dict]:
    """Per world size: windows shorter than a shard, spanning shards and longer than the sequence, causal and
    not, both layouts, varlen with the host hint, softcap, sinks and v head dim 16 with q/k 24 (also without a
    window: the ops' unwindowed schedules)."""
    h = 6 if (op_name in ("ulysses_attention", "usp_attention") and p == 3) else 4 if p < 8 else 8
    seq = 4 * p  # local shard: 4 tokens, zigzag chunks of 2
    base = dict(h=h, h_kv=2, d=24, dtype=torch.float64)
    cases = [
        dict(batch=1, seq_len=seq, causal=True, layout="zigzag", window=(1, 0), **base),
        dict(batch=2, seq_len=seq, causal=False, layout="contiguous", window=(6, 3), **base),
        dict(batch=1, seq_len=seq, causal=True, layout="contiguous", window=(5, 0), softcap=2.0, dv=16,
             sinks=True, **base),
        dict(batch=1, seq_len=seq, causal=False, layout="zigzag", window=(3 * seq, -1), **base),
        dict(lens=[2 * p, 6 * p, 4 * p], causal=True, layout="zigzag", window=(3, 0), hint=True, sinks=True,
             **base),
        dict(batch=1, seq_len=seq, causal=True, layout="zigzag", window=(2, 1), softcap=1.5, dv=16,
             **{**base, "dtype": torch.float32}),
        dict(batch=2, seq_len=seq, causal=True, layout="zigzag", softcap=2.0, dv=16, sinks=True, **base),  # no window
    ]
    if p == 8:  # keep the biggest world small: the short window, softcap/sinks/dv with and without a window, varlen
        cases = [cases[0], cases[2], cases[4], cases[6]]
    return cases


def check_window_cases(op_name: str) -> list[tuple[dict, dict]]:
    cases = window_cases(op_name, dist.get_world_size())
    return [(case, check_against_reference(op_name, seed=i, **case)) for i, case in enumerate(cases)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op_name", OPS)
def test_ops_with_window_softcap_sinks_match_float64(op_name, world_size):
    results = run_distributed(check_window_cases, world_size, op_name)
    for i, (case, _) in enumerate(results[0]):
        f64 = case["dtype"] == torch.float64
        out_tol, grad_tol = (1e-10, 1e-10) if f64 else (1e-5, 1e-4)
        for rank, rank_results in enumerate(results):
            err = rank_results[i][1]
            assert err["out"] < out_tol, (rank, case, err)
            assert max(err["dq"], err["dk"], err["dv"]) < grad_tol, (rank, case, err)
        if case.get("sinks"):  # the sinks' gradient: every rank's share, summed, is the single-device one
            total = sum(rank_results[i][1]["d_sinks"] for rank_results in results)
            ref = results[0][i][1]["ref_d_sinks"]
            assert float((total - ref).abs().max() / ref.abs().max()) < grad_tol, (case, total, ref)


# ----------------------------------------------------------------------------------------------------
# Bytes with a window: the formula of ring.py / token_ring.py, and the hops saved
# ----------------------------------------------------------------------------------------------------


def measure_window_bytes(op_name, *, window, layout, causal, seq_len, dv=16):
    q, k, v, dout, _ = global_inputs(1, batch=1, seq_len=seq_len, h=4, h_kv=2, d=24, dv=dv)
    ql, kl, vl = (shard_sequence(t, layout=layout).float().requires_grad_(True) for t in (q, k, v))
    with count_comm() as fwd:
        out = softmax_op(op_name)(ql, kl, vl, causal=causal, layout=layout, window=window)
    with count_comm() as bwd:
        out.backward(shard_sequence(dout, layout=layout).float())
    return fwd.bytes_sent, bwd.bytes_sent


def _meets(p, local_len, layout, causal, window, q_rank, kv_rank):
    """Independent brute force: does some query position of q_rank's shard see a key of kv_rank's shard?"""
    def positions(rank):
        return shard_indices(p * local_len, p, rank, layout=layout).tolist()
    left, right = window
    return any(
        (not causal or j <= i) and (left < 0 or i - j <= left) and (right < 0 or j - i <= right)
        for i in positions(q_rank) for j in positions(kv_rank)
    )


@pytest.mark.parametrize("world_size", [4])
def test_ring_window_bytes_equal_the_formula_and_skip_hops(world_size):
    """Ring with a window sends K/V only to the ranks whose queries meet them (ring.py's table):
    forward n_out * T H_kv (D + Dv) b, backward that plus n_in * T H_kv (D + Dv) * 4. A window shorter than a
    shard: contiguous causal needs 1 message instead of P - 1, zigzag 2."""
    p, local_len, t, h_kv, d, dv = world_size, 4, 4, 2, 24, 16
    kv = t * h_kv * (d + dv)
    for layout, causal, window, max_messages in (("contiguous", True, (2, 0), 1), ("zigzag", True, (1, 0), 2),
                                                 ("zigzag", False, (1, 1), 2), ("contiguous", False, (100, 5), 3)):
        results = run_distributed(measure_window_bytes, p, "ring_attention", window=window, layout=layout,
                                  causal=causal, seq_len=p * local_len, dv=dv)
        for r, (fwd, bwd) in enumerate(results):
            n_out = sum(_meets(p, local_len, layout, causal, window, j, r) for j in range(p) if j != r)
            n_in = sum(_meets(p, local_len, layout, causal, window, r, j) for j in range(p) if j != r)
            assert (fwd, bwd) == (n_out * kv * 4, n_out * kv * 4 + n_in * kv * 4), (layout, window, r)
            assert n_out <= max_messages, (layout, window, r, n_out)
        if layout == "zigzag" and causal:  # the registry's formula: the mean over ranks (2 D = D + Dv here)
            shape = LayerShape(seq_len=p * local_len, degree=p, heads=4, kv_heads=h_kv, head_dim=(d + dv) // 2,
                               elem_bytes=4, window=window[0] + 1)
            mean = [sum(col) / p for col in zip(*results)]
            assert strategies.get("ring").comm_bytes(shape) == pytest.approx(mean, rel=1e-12), (window, mean)
        no_window = run_distributed(measure_window_bytes, p, "ring_attention", window=None, layout=layout,
                                    causal=causal, seq_len=p * local_len, dv=dv)
        assert all(f == (p - 1) * kv * 4 for f, _ in no_window)


def test_token_ring_window_bytes_equal_the_formula_and_skip_hops():
    """TokenRing, contiguous causal window shorter than a shard at P = 4: rank r's queries meet only rank r - 1's
    keys, so one query hop (ranks r >= 1) and one partial back (ranks r <= P - 2) instead of P - 1 each
    (token_ring.py). Forward: q (T H D b), partial out + lse (T H (Dv b + 4)); backward: lse, q, dout, out
    (T H (4 + D b + 2 Dv b)), dQ (T H D b)."""
    p, t, h, d, dv, b = 4, 4, 4, 24, 16, 4
    results = run_distributed(measure_window_bytes, p, "token_ring_attention", window=(2, 0), layout="contiguous",
                              causal=True, seq_len=p * t, dv=dv)
    for r, (fwd, bwd) in enumerate(results):
        sends_queries, returns_partial = r >= 1, r <= p - 2
        assert fwd == sends_queries * t * h * d * b + returns_partial * t * h * (dv * b + 4), r
        assert bwd == sends_queries * t * h * (4 + d * b + 2 * dv * b) + returns_partial * t * h * d * b, r


def bad_window_options(op_name):
    """Errors each rank gets: bad options (before any transfer), and ranks that disagree on the window."""
    rank = dist.get_rank()
    q, k, v = (torch.randn(1, 4, 4, 8) for _ in range(3))
    op = softmax_op(op_name)
    return value_errors({
        "window": lambda: op(q, k, v, causal=True, window=(0, -3)),
        "softcap": lambda: op(q, k, v, causal=True, softcap=float("nan")),
        "sinks": lambda: op(q, k, v, causal=True, sinks=torch.zeros(2)),
        "disagree": lambda: op(q, k, v, causal=True, window=(rank + 1, 0)),
    })


@pytest.mark.parametrize("op_name", OPS)
def test_bad_options_raise_on_every_rank(op_name):
    for errors in run_distributed(bad_window_options, 2, op_name):
        for name in ("window", "softcap", "sinks"):
            assert errors[name] is not None and errors[name].startswith(name + ":"), errors
        assert errors["disagree"] is not None and "window" in errors["disagree"], errors


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_softcap_matches_reference():
    """Triton's softcap (forward and backward, padded with Sq < Sk and packed varlen) under the interpreter
    (conftest sets TRITON_INTERPRET=1), float32 against the float64 reference: 1e-5 / 1e-4."""
    gen = torch.Generator().manual_seed(13)
    cases = [dict(shape_q=(1, 9, 2, 16), shape_k=(1, 20, 1, 16), cu=None),  # two key blocks of 16
             dict(shape_q=(11, 2, 16), shape_k=(11, 1, 16), cu=torch.tensor([0, 4, 5, 11], dtype=torch.int32))]
    for case in cases:
        q = torch.randn(case["shape_q"], generator=gen, dtype=torch.float64) * 3  # big scores: the cap matters
        k = torch.randn(case["shape_k"], generator=gen, dtype=torch.float64)
        v = torch.randn(case["shape_k"], generator=gen, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref, _ = reference_attention(*leaves, causal=True, softcap=1.5, cu_seqlens=case["cu"])
        dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        packed = {} if case["cu"] is None else {"cu_seqlens_q": case["cu"], "cu_seqlens_k": case["cu"]}
        leaves32 = [t.float().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves32, causal=True, softcap=1.5, backend="triton", **packed)
        grads = torch.autograd.grad(out, leaves32, dout.float())
        assert ((out.double() - ref).norm() / ref.norm()) < 1e-5
        for g, r in zip(grads, ref_grads):
            assert ((g.double() - r).norm() / r.norm()) < 1e-4
