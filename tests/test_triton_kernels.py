"""Triton kernels against the float64 references, on the CPU under the Triton interpreter.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the kernels run as numpy programs.
The attention kernels are reached by name through the normal dispatch (``backend="triton"``, which runs on
CPU tensors under the interpreter; ``"auto"`` on CPU stays torch); linear attention via
``linear_attention_chunk(backend="triton")``. Shapes are tiny and blocks are 16 wide so that every path
(partial blocks, causal diagonal, rows with no key, GQA groups, several sequences) runs in a few programs.

Float32 tolerances are the contract's (1e-5 outputs, 1e-4 gradients); the interpreter's tl.dot is numpy
float32 (no TF32), and measured errors are ~1e-7. bf16 is compared with the reference evaluated on the same
bf16-rounded inputs, within 2e-2.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.checks import rel_err

from seqpar.kernels.attention import (
    attention,
    attention_block,
    attention_block_backward,
    attention_block_varlen,
    attention_block_varlen_backward,
    get_attention_backend,
    merge_attention_outputs,
)
from seqpar.kernels.fused_merge import attention_block_merge, has_fused_merge
from seqpar.kernels.linear import linear_attention_chunk, resolve_linear_backend
from seqpar.kernels.reference import reference_attention, reference_linear_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TRITON = "triton"
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _ref_with_grads(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dout)


# ----------------------------------------------------------------------------------------------------
# Backend selection (no triton needed)
# ----------------------------------------------------------------------------------------------------


def test_auto_on_cpu_is_torch_and_triton_is_asked_for_by_name():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert get_attention_backend("auto", CPU, dtype).name == "torch"
        assert resolve_linear_backend("auto", CPU, dtype) == "torch"
    if HAS_TRITON:  # by name, the interpreter runs it on CPU; float64 it cannot run anywhere
        assert get_attention_backend("triton", CPU, torch.float32).name == "triton"
        with pytest.raises(ValueError, match="backend: 'triton' cannot run on cpu"):
            get_attention_backend("triton", CPU, torch.float64)
    with pytest.raises(ValueError, match="backend: unknown linear-attention backend"):
        resolve_linear_backend("flash_attn", CPU, torch.float32)
    with pytest.raises(ValueError, match="backend: 'triton' linear attention cannot run"):
        resolve_linear_backend("triton", CPU, torch.float64)
    assert not has_fused_merge("torch", CPU, torch.float32)


def test_seqpar_imports_without_triton_and_flash_attn():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['flash_attn'] = None\n"
        "import torch, seqpar.kernels as K\n"
        "from seqpar.kernels.attention import available_attention_backends as a\n"
        "assert 'triton' not in a() and 'flash_attn' not in a(), a()\n"
        "assert set(K.OPTIONAL_BACKEND_ERRORS) == {'triton', 'flash_attn'}, K.OPTIONAL_BACKEND_ERRORS\n"
        "q = torch.randn(1, 5, 2, 8)\n"
        "K.linear_attention_chunk(q, q, q)\n"
        "assert K.get_attention_backend('auto', q.device, q.dtype).name == 'torch'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr


def test_gpu_check_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench/gpu_check.py would run the full check")
    result = ROOT / "bench" / "results" / "gpu_check.json"
    before = result.stat().st_mtime_ns if result.exists() else None
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    assert "no CUDA device" in run.stdout
    assert (result.stat().st_mtime_ns if result.exists() else None) == before  # nothing written without a GPU


@needs_triton
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs Python, not the compiler: AOT-compile one variant of every kernel for sm_90a so that
    what only the compiler rejects (non-constexpr globals, unsupported constructs) fails here too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--compile-only", "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "compiled 27/27 kernel variants" in run.stdout  # 7 attention (causal; window + positions), 5 linear x 2,
    # 5 gated delta rule x 2 gates (GDN, KDA)


# ----------------------------------------------------------------------------------------------------
# Triton attention
# ----------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "sq,sk,h,h_kv,d,causal,dtype",
    [
        (33, 33, 4, 2, 32, True, torch.float32),  # partial last block, diagonal, GQA 2
        (17, 40, 2, 1, 32, True, torch.float32),  # Sq < Sk: bottom-right diagonal inside the key range
        (40, 17, 2, 2, 32, True, torch.float32),  # Sq > Sk: the first 23 rows see no key
        (24, 24, 4, 4, 32, False, torch.float32),
        (20, 29, 2, 1, 24, True, torch.float32),  # head dim that is not a power of two (masked)
        (33, 33, 4, 2, 32, True, torch.bfloat16),
    ],
)
def test_triton_attention_block_matches_reference(sq, sk, h, h_kv, d, causal, dtype):
    gen = torch.Generator().manual_seed(sq * 100 + sk)
    q, k, v = _rand(gen, 2, sq, h, d), _rand(gen, 2, sk, h_kv, d), _rand(gen, 2, sk, h_kv, d)
    dout = _rand(gen, 2, sq, h, d)
    if dtype != torch.float32:  # the reference sees the same rounded inputs
        q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))
    ref_out, ref_grads = _ref_with_grads(lambda a, b, c: reference_attention(a, b, c, causal=causal)[0],
                                         (q, k, v), dout)
    ref_lse = reference_attention(q, k, v, causal=causal)[1]
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    out, lse = attention_block(qd, kd, vd, causal=causal, backend=TRITON)
    grads = attention_block_backward(dout.to(dtype), qd, kd, vd, out, lse, causal=causal, backend=TRITON)
    out_tol, grad_tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, h, sq)
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), visible) and not torch.isnan(lse).any()
    assert not torch.isnan(out).any() and (out[~visible.transpose(1, 2)] == 0).all()
    assert rel_err(out, ref_out) < out_tol
    assert rel_err(lse[visible], ref_lse[visible]) < out_tol
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape and rel_err(g, r) < grad_tol


@needs_triton
def test_triton_attention_varlen_and_autograd():
    gen = torch.Generator().manual_seed(11)
    lens_q, lens_k = [5, 1, 19, 7, 0], [9, 2, 19, 4, 3]  # includes a one-token and an empty query sequence
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v = _rand(gen, sum(lens_q), 4, 32), _rand(gen, sum(lens_k), 2, 32), _rand(gen, sum(lens_k), 2, 32)
    dout = _rand(gen, sum(lens_q), 4, 32)

    def per_sequence(a, b, c):
        outs = [
            reference_attention(a[None, cu_q[i]:cu_q[i + 1]], b[None, cu_k[i]:cu_k[i + 1]],
                                c[None, cu_k[i]:cu_k[i + 1]], causal=True)[0][0]
            for i in range(len(lens_q))
        ]
        return torch.cat(outs)

    ref, ref_grads = _ref_with_grads(per_sequence, (q, k, v), dout)
    q32, k32, v32 = q.float(), k.float(), v.float()
    out, lse = attention_block_varlen(q32, k32, v32, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, backend=TRITON)
    assert lse.shape == (4, sum(lens_q)) and rel_err(out, ref) < 1e-5
    direct = attention_block_varlen_backward(
        dout.float(), q32, k32, v32, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, backend=TRITON
    )
    leaves = [x.clone().requires_grad_(True) for x in (q32, k32, v32)]
    through = torch.autograd.grad(
        attention(*leaves, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=TRITON), leaves, dout.float()
    )
    for got_direct, got_autograd, r in zip(direct, through, ref_grads):
        assert rel_err(got_direct, r) < 1e-4 and rel_err(got_autograd, r) < 1e-4


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_fused_merge_equals_unfused_and_the_union(packed):
    """Three K/V blocks folded into a running (out, lse): the first with out_acc=None, the second a causal block
    with Sq > Sk (rows with lse -inf), the third a full block; fused (Triton epilogue) == unfused == reference."""
    gen = torch.Generator().manual_seed(5)
    b, sq, h, h_kv, d = 2, 20, 2, 1, 32
    q = _rand(gen, b, sq, h, d)
    ks = [_rand(gen, b, n, h_kv, d) for n in (12, 6, 9)]
    vs = [_rand(gen, b, n, h_kv, d) for n in (12, 6, 9)]
    causal = [False, True, False]
    visible = torch.cat([torch.ones(sq, 12, dtype=torch.bool),
                         torch.arange(6)[None, :] <= torch.arange(sq)[:, None] + (6 - sq),
                         torch.ones(sq, 9, dtype=torch.bool)], 1)
    ref, ref_lse = _masked_reference(q, torch.cat(ks, 1), torch.cat(vs, 1), visible)

    def pack(x):  # (B, S, H, D) -> (B*S, H, D)
        return x.reshape(-1, *x.shape[2:])

    results = {}
    for backend in (TRITON, "torch"):
        out = lse = None
        for kb, vb, c in zip(ks, vs, causal):
            if packed:
                cu_q = torch.arange(b + 1, dtype=torch.int32) * sq
                cu_k = torch.arange(b + 1, dtype=torch.int32) * kb.shape[1]
                out, lse = attention_block_merge(
                    pack(q).float(), pack(kb).float(), pack(vb).float(), out, lse, causal=c, backend=backend,
                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                )
            else:
                out, lse = attention_block_merge(q.float(), kb.float(), vb.float(), out, lse, causal=c, backend=backend)
        results[backend] = (out, lse)
    assert has_fused_merge(TRITON, CPU, torch.float32)
    out, lse = results[TRITON]
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    if packed:
        out, lse = out.view(b, sq, h, d), lse.view(h, b, sq).transpose(0, 1)
        results["torch"] = (results["torch"][0].view(b, sq, h, d), results["torch"][1].view(h, b, sq).transpose(0, 1))
    assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    assert rel_err(out, results["torch"][0]) < 1e-5 and rel_err(lse, results["torch"][1]) < 1e-5


def _masked_reference(q, k, v, visible):
    """Softmax attention with an explicit (Sq, Sk) visibility mask, float64 (GQA by repetition)."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v), lse


@needs_triton
def test_fused_merge_of_an_empty_first_block_keeps_rows_at_minus_inf():
    gen = torch.Generator().manual_seed(9)
    q, k, v = _rand(gen, 1, 20, 2, 32).float(), _rand(gen, 1, 3, 2, 32).float(), _rand(gen, 1, 3, 2, 32).float()
    out, lse = attention_block_merge(q, k, v, None, None, causal=True, backend=TRITON)
    assert torch.isinf(lse[..., :17]).all() and (out[:, :17] == 0).all()
    ref_out, ref_lse = attention_block(q, k, v, causal=True)
    out2, lse2 = attention_block_merge(q, k, v, out, lse, causal=True, backend=TRITON)  # the same block twice
    want_out, want_lse = merge_attention_outputs(ref_out.float(), ref_lse, ref_out, ref_lse)
    assert not torch.isnan(out2).any() and torch.equal(torch.isinf(lse2), torch.isinf(want_lse))
    assert rel_err(out2, want_out) < 1e-5


@needs_triton
def test_triton_attention_rejects_bad_input():
    q = torch.randn(1, 8, 4, 32)
    with pytest.raises(ValueError, match="k: q's 4 heads must be a multiple"):
        attention_block(q, torch.randn(1, 8, 3, 32), torch.randn(1, 8, 3, 32), backend=TRITON)
    with pytest.raises(ValueError, match="head dim 512"):
        attention_block(torch.randn(1, 4, 1, 512), torch.randn(1, 4, 1, 512), torch.randn(1, 4, 1, 512), backend=TRITON)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention_block_varlen(q[0], q[0], q[0], cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32),
                               cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32), backend=TRITON)


# ----------------------------------------------------------------------------------------------------
# Triton linear attention
# ----------------------------------------------------------------------------------------------------


def _decay(kind, b, s, h, dk, gen):
    if kind == "none":
        return None
    if kind == "head":
        return -torch.rand(h, generator=gen, dtype=torch.float64) * 0.5
    if kind == "key":  # GLA: per token and key dimension, spread wide so a per-head mean would be far off
        return -torch.rand(b, s, h, dk, generator=gen, dtype=torch.float64) ** 2 * 1.5
    return -torch.rand(b, s, h, generator=gen, dtype=torch.float64) * 0.5


@needs_triton
@pytest.mark.parametrize(
    "decay,s,chunk,dtype,with_state",
    [
        ("none", 37, 16, torch.float32, True),  # ragged last chunk
        ("head", 48, 16, torch.float32, True),
        ("token", 37, 16, torch.float32, True),
        ("token", 64, 32, torch.float32, False),  # no initial state, chunk 32
        ("token", 40, 16, torch.bfloat16, True),
        ("key", 37, 16, torch.float32, True),  # GLA, ragged last chunk
        ("key", 32, 32, torch.bfloat16, False),
    ],
)
def test_triton_linear_attention_matches_recurrence(decay, s, chunk, dtype, with_state):
    gen = torch.Generator().manual_seed(s * 10 + chunk)
    b, h, dk, dv = 2, 2, 32, 16
    q, k, v = _rand(gen, b, s, h, dk), _rand(gen, b, s, h, dk), _rand(gen, b, s, h, dv)
    g = _decay(decay, b, s, h, dk, gen)
    s0 = _rand(gen, b, h, dk, dv) if with_state else None
    if dtype != torch.float32:
        q, k, v = (x.to(dtype).double() for x in (q, k, v))
    named = {"q": q, "k": k, "v": v, "initial_state": s0, "log_decay": g}
    names = [n for n, x in named.items() if x is not None]
    do, ds = _rand(gen, b, s, h, dv), _rand(gen, b, h, dk, dv)

    def loss_and_grads(fn):
        leaves = {n: named[n].detach().clone().requires_grad_(True) for n in names}
        o, final = fn(leaves)
        loss = (o.double() * do).sum() + (final.double() * ds).sum()
        return o, final, dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))

    ref_o, ref_s, ref_g = loss_and_grads(lambda x: reference_linear_attention(
        x["q"], x["k"], x["v"], log_decay=x.get("log_decay"), initial_state=x.get("initial_state")))
    o, final, grads = loss_and_grads(lambda x: linear_attention_chunk(
        x["q"].to(dtype), x["k"].to(dtype), x["v"].to(dtype),
        log_decay=x["log_decay"].float() if "log_decay" in x else None,
        initial_state=x["initial_state"].float() if "initial_state" in x else None,
        output_final_state=True, chunk_size=chunk, backend="triton"))
    out_tol, grad_tol = TOL[dtype]
    assert o.dtype == dtype and final.dtype == torch.float32
    assert rel_err(o, ref_o) < out_tol and rel_err(final, ref_s) < out_tol
    for n in names:
        assert rel_err(grads[n], ref_g[n]) < grad_tol, n


@needs_triton
def test_triton_linear_without_final_state_and_lasp2_pieces():
    """Output-only use (no final-state gradient), and the pieces LASP-2/ZeCO use: the state contribution M of
    a chunk (zero initial state) and the correction of an incoming state, which together give the whole."""
    gen = torch.Generator().manual_seed(21)
    b, s, h, dk, dv = 1, 40, 2, 32, 32
    q, k, v = (_rand(gen, b, s, h, d).float() for d in (dk, dk, dv))
    g = (-torch.rand(b, s, h, generator=gen) * 0.3)
    s_in = torch.randn(b, h, dk, dv, generator=gen)
    whole, whole_state = linear_attention_chunk(q, k, v, log_decay=g, initial_state=s_in, output_final_state=True,
                                                backend="triton", chunk_size=16)
    local, m = linear_attention_chunk(q, k, v, log_decay=g, output_final_state=True, backend="triton", chunk_size=16)
    from seqpar.kernels.linear import linear_attention_inter, total_log_decay

    decay = torch.exp(total_log_decay(g, b, s, h, torch.float32, q.device))[..., None, None]
    assert rel_err(local + linear_attention_inter(q, s_in, log_decay=g), whole) < 1e-5
    assert rel_err(m + decay * s_in, whole_state) < 1e-5
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, none = linear_attention_chunk(*leaves, log_decay=g, backend="triton", chunk_size=16)
    assert none is None
    grads = torch.autograd.grad(o.sum(), leaves)
    ref_leaves = [x.double().clone().requires_grad_(True) for x in (q, k, v)]
    ref_o, _ = reference_linear_attention(*ref_leaves, log_decay=g.double())
    for got, ref in zip(grads, torch.autograd.grad(ref_o.sum(), ref_leaves)):
        assert rel_err(got, ref) < 1e-4


def test_auto_keeps_a_backend_that_takes_a_per_key_decay(monkeypatch):
    """GLA (B, S, H, Dk) runs where ``"auto"`` resolves, if that backend takes a per-key decay (Triton does);
    otherwise ``"auto"`` falls back to torch and asking for it by name raises naming ``log_decay``."""
    from seqpar.kernels import linear

    if HAS_TRITON:
        assert linear.get_linear_backend(TRITON, CPU, torch.float32).key_decay
    gla = torch.zeros(1, 4, 2, 8)

    def fake(key_decay):
        return linear.LinearBackend(name=TRITON, chunk=lambda *a, **k: None, supports=lambda device, dtype: True,
                                    auto_eligible=lambda device, dtype: True, key_decay=key_decay)

    monkeypatch.setitem(linear._BACKENDS, TRITON, fake(True))
    assert linear.backend_for_decay("auto", CPU, torch.float32, gla).name == TRITON
    monkeypatch.setitem(linear._BACKENDS, TRITON, fake(False))
    assert linear.backend_for_decay("auto", CPU, torch.float32, gla).name == "torch"
    assert linear.backend_for_decay("auto", CPU, torch.float32, gla[..., 0]).name == TRITON  # per token: kept
    with pytest.raises(ValueError, match="log_decay: the 'triton' backend has no per-key"):
        linear.backend_for_decay(TRITON, CPU, torch.float32, gla)
