"""Torch-backend kernels against the float64 references (which are the definitions, not the kernels)."""

import importlib
import math

import pytest
import torch
from tests.checks import rel_err

from seqpar.collectives.layout import validate_cu_seqlens as layout_validate_cu_seqlens
from seqpar.kernels.attention import (
    attention,
    attention_block,
    attention_block_backward,
    attention_block_varlen,
    attention_block_varlen_backward,
    merge_attention_outputs,
    merge_attention_outputs_,
)
from seqpar.kernels.linear import chunk_state, linear_attention_chunk
from seqpar.kernels.reference import reference_attention, reference_linear_attention
from seqpar.kernels.varlen import validate_cu_seqlens

TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-11), torch.bfloat16: (2e-2, 2e-2)}


def grads_of(fn, inputs, dout):
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "sq,sk,h,h_kv,d,causal",
    [(33, 33, 8, 2, 32, True), (17, 40, 4, 1, 64, True), (40, 17, 4, 4, 32, True), (21, 21, 8, 8, 128, False),
     (9, 30, 6, 3, 64, False), (1, 3, 2, 1, 32, True)],
)
def test_attention_block_matches_reference(sq, sk, h, h_kv, d, causal, dtype):
    gen = torch.Generator().manual_seed(sq * 1000 + sk * 10 + h_kv)
    q, k, v = (torch.randn(2, n, heads, d, generator=gen, dtype=torch.float64)
               for n, heads in ((sq, h), (sk, h_kv), (sk, h_kv)))
    dout = torch.randn(2, sq, h, d, generator=gen, dtype=torch.float64)
    ref_out, ref_grads = grads_of(lambda a, b, c: reference_attention(a, b, c, causal=causal)[0], (q, k, v), dout)
    _, ref_lse = reference_attention(q, k, v, causal=causal)
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    out, lse = attention_block(qd, kd, vd, causal=causal)
    grads = attention_block_backward(dout.to(dtype), qd, kd, vd, out, lse, causal=causal)
    out_tol, grad_tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype in (torch.float32, torch.float64)
    assert rel_err(out, ref_out) < out_tol
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), visible)  # rows with no visible key: -inf, never NaN or 0
    assert not torch.isnan(out).any()
    assert (out[~visible.transpose(1, 2)] == 0).all()
    assert rel_err(lse[visible], ref_lse[visible]) < out_tol
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and rel_err(g, r) < grad_tol


def test_varlen_block_keeps_sequences_apart():
    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k = [5, 1, 12, 7, 3], [9, 2, 12, 4, 3]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens_k), 2, 32, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 32, generator=gen, dtype=torch.float64)
    dout = torch.randn_like(q)
    refs = []
    for i in range(5):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]][None], k[cu_k[i]:cu_k[i + 1]][None], v[cu_k[i]:cu_k[i + 1]][None]
        refs.append(reference_attention(qi, ki, vi, causal=True)[0][0])
    ref = torch.cat(refs)
    q32, k32, v32 = q.float(), k.float(), v.float()
    out, lse = attention_block_varlen(q32, k32, v32, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    assert lse.shape == (4, sum(lens_q))
    assert rel_err(out, ref) < 1e-5
    # gradients through the differentiable wrapper vs autograd through the per-sequence reference
    _, ref_grads = grads_of(
        lambda a, b, c: torch.cat([
            reference_attention(a[cu_q[i]:cu_q[i + 1]][None], b[cu_k[i]:cu_k[i + 1]][None],
                                c[cu_k[i]:cu_k[i + 1]][None], causal=True)[0][0]
            for i in range(5)]),
        (q, k, v), dout)
    _, grads = grads_of(lambda a, b, c: attention(a, b, c, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
                        (q32, k32, v32), dout.float())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4
    direct = attention_block_varlen_backward(dout.float(), q32, k32, v32, out, lse, cu_seqlens_q=cu_q,
                                             cu_seqlens_k=cu_k, causal=True)
    for g, r in zip(direct, ref_grads):
        assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("in_place", [False, True])
def test_merge_of_partials_equals_attention_over_the_union_and_is_inf_safe(in_place):
    merge = merge_attention_outputs_ if in_place else merge_attention_outputs
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 2, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 10, 2, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 10, 2, 16, generator=gen, dtype=torch.float64)
    ref, ref_lse = reference_attention(q, k, v)
    a = attention_block(q.float(), k[:, :4].float(), v[:, :4].float())
    # the second block is causal bottom-right with Sq > Sk: its first rows see nothing (lse -inf)
    b_out, b_lse = attention_block(q.float(), k[:, 4:].float(), v[:, 4:].float())
    empty_out, empty_lse = attention_block(q.float(), k[:, :1].float(), v[:, :1].float(), causal=True)
    assert torch.isinf(empty_lse[..., :5]).all()
    out, lse = merge_attention_outputs(None, None, empty_out, empty_lse)
    accumulators = (out, lse)
    out, lse = merge(out, lse, *a)
    out, lse = merge(out, lse, b_out, b_lse)
    if in_place:  # the caller's accumulators hold the result
        assert out is accumulators[0] and lse is accumulators[1]
    # undo the extra key the "empty" block added to the last row by comparing rows 0..4 only
    assert not torch.isnan(out).any()
    assert rel_err(out[:, :5], ref[:, :5]) < 1e-6
    assert rel_err(lse[..., :5], ref_lse[..., :5]) < 1e-6


def _decay(kind, b, s, h, gen):
    if kind == "none":
        return None
    if kind == "head":
        return -torch.rand(h, generator=gen, dtype=torch.float64) * 0.5
    return -torch.rand(b, s, h, generator=gen, dtype=torch.float64) * 0.5


@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("s,chunk", [(37, 8), (64, 64), (5, 16)])
def test_chunked_linear_attention_matches_recurrence(decay, s, chunk):
    gen = torch.Generator().manual_seed(s + chunk)
    b, h, dk, dv = 2, 3, 16, 8
    q, k = (torch.randn(b, s, h, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64)
    g = _decay(decay, b, s, h, gen)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    inputs = [q, k, v, s0] + ([g] if g is not None else [])
    do = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64)
    ds = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)

    def loss_with(fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        o, final = fn(*leaves)
        loss = (o.double() * do).sum() + (final.double() * ds).sum()
        return o, final, torch.autograd.grad(loss, leaves)

    ref_o, ref_s, ref_g = loss_with(lambda q, k, v, s0, *g: reference_linear_attention(
        q, k, v, log_decay=g[0] if g else None, initial_state=s0))
    o, fs, grads = loss_with(lambda q, k, v, s0, *g: linear_attention_chunk(
        q.float(), k.float(), v.float(), log_decay=g[0].float() if g else None, initial_state=s0.float(),
        output_final_state=True, chunk_size=chunk))
    assert rel_err(o, ref_o) < 1e-5 and rel_err(fs, ref_s) < 1e-5
    for got, ref in zip(grads, ref_g):
        assert rel_err(got, ref) < 1e-4
    assert math.isfinite(o.sum().item())


def test_linear_attention_rejects_bad_input():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="log_decay: must be <= 0"):
        linear_attention_chunk(q, q, q, log_decay=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention_chunk(q, q, q, initial_state=torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="v: expected"):
        linear_attention_chunk(q, q, torch.randn(1, 5, 2, 8))


def test_linear_backend_registry_dispatches_by_name_and_names_backend_in_errors(monkeypatch):
    """A registered LinearBackend is what ``backend=`` selects; "auto" on CPU is torch; unknown names and
    backends that cannot run here raise ValueError naming ``backend``."""
    linear = importlib.import_module("seqpar.kernels.linear")
    calls = []

    def doubled(q, k, v, **options):  # a backend whose answer differs from torch's: dispatch is visible
        calls.append(options)
        o, state = linear.get_linear_backend("torch", q.device, q.dtype).chunk(q, k, v, **options)
        return 2 * o, state

    backend = linear.LinearBackend(name="doubled", chunk=doubled, supports=lambda device, dtype: dtype == torch.float32)
    monkeypatch.setitem(linear._BACKENDS, "doubled", backend)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 4, generator=gen) for _ in range(3))
    ref, _ = reference_linear_attention(q.double(), k.double(), v.double(), scale=0.5)
    o, _ = linear_attention_chunk(q, k, v, scale=0.5, backend="doubled")
    assert rel_err(o, 2 * ref) < 1e-5 and calls[0]["scale"] == 0.5 and calls[0]["chunk_size"] == 64
    assert linear.get_linear_backend("auto", torch.device("cpu"), torch.float32).name == "torch"
    assert "doubled" in linear.available_linear_backends()
    with pytest.raises(ValueError, match="^backend: unknown linear-attention backend 'nope'"):
        linear_attention_chunk(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="^backend: 'doubled' linear attention cannot run on cpu with torch.float64"):
        linear_attention_chunk(q.double(), k.double(), v.double(), backend="doubled")


def test_chunk_state_is_the_final_state_without_initial_state():
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 13, 3, 4, generator=gen, dtype=torch.float64), torch.randn(2, 13, 3, 5, generator=gen,
                                                                                      dtype=torch.float64)
    for log_decay in (None, -torch.rand(3, generator=gen, dtype=torch.float64),
                      -torch.rand(2, 13, 3, generator=gen, dtype=torch.float64)):
        _, ref_state = reference_linear_attention(torch.zeros_like(k), k, v, log_decay=log_decay)
        assert rel_err(chunk_state(k, v, log_decay), ref_state) < 1e-12


def test_one_cu_seqlens_check_for_every_layer():
    """layout's validate_cu_seqlens is the kernels' one; the kernels' form also accepts empty sequences."""
    assert layout_validate_cu_seqlens is validate_cu_seqlens
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert validate_cu_seqlens(cu, 7, allow_empty=True) == [0, 3, 3, 7]
    assert validate_cu_seqlens(torch.tensor([0], dtype=torch.int32), 0, allow_empty=True) == [0]
    with pytest.raises(ValueError, match="^cu_seqlens: must be strictly increasing"):
        validate_cu_seqlens(cu, 7)
    with pytest.raises(ValueError, match="^cu_seqlens_q: must not decrease"):
        validate_cu_seqlens(torch.tensor([0, 4, 3], dtype=torch.int32), 3, name="cu_seqlens_q", allow_empty=True)
    with pytest.raises(ValueError, match="^cu_seqlens_k: must be int32"):
        validate_cu_seqlens(cu.long(), 7, name="cu_seqlens_k")
    with pytest.raises(ValueError, match="^cu_seqlens: last entry 7 must equal the number of tokens 8"):
        validate_cu_seqlens(torch.tensor([0, 7], dtype=torch.int32), 8)
