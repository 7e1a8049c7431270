"""The torch backend's tiled causal blocks (seqpar/kernels/attention.py, ``_tiled_causal_forward``): a causal square
block of at least ``_CAUSAL_TILE_MIN`` tokens runs as full lower-left rectangles plus small causal leaves, one aten
call per level over strided views. Checked against the float64 definition, on its own and as the ring's step-0
block, and for the cases it must leave to the one-call path."""

import importlib

import pytest
import torch
from tests.harness import run_distributed
from tests.sp_cases import check_against_reference

from seqpar.kernels.reference import reference_attention

attention = importlib.import_module("seqpar.kernels.attention")  # the module (seqpar.kernels exports a function too)


def _spy(monkeypatch):
    """Count the tiled forward and backward calls."""
    calls = {"forward": 0, "backward": 0}
    for kind, name in (("forward", "_tiled_causal_forward"), ("backward", "_tiled_causal_backward")):
        original = getattr(attention, name)

        def counted(*args, _kind=kind, _original=original):
            calls[_kind] += 1
            return _original(*args)

        monkeypatch.setattr(attention, name, counted)
    return calls


def _block_and_reference(q, k, v, dout):
    """(out, lse, dq, dk, dv) of the torch backend's causal block and of the float64 definition."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*leaves, causal=True)
    ref = [ref_out, ref_lse, *torch.autograd.grad(ref_out, leaves, dout.double())]
    out, lse = attention.attention_block(q, k, v, causal=True, backend="torch")
    grads = attention.attention_block_backward(dout, q, k, v, out, lse, causal=True, backend="torch")
    return [out, lse, *grads], ref


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_causal_block_matches_float64_reference(monkeypatch, dtype):
    calls = _spy(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    # S = 600: levels of 300 and 150 (leaves of 150); B = 2 and GQA (4 query heads on 2 kv heads)
    q, dout = (torch.randn(2, 600, 4, 32, generator=gen, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(2, 600, 2, 32, generator=gen, dtype=dtype) for _ in range(2))
    got, ref = _block_and_reference(q, k, v, dout)
    assert calls == {"forward": 1, "backward": 1}
    out_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-11)
    assert _rel(got[0], ref[0]) < out_tol and _rel(got[1], ref[1]) < out_tol
    assert max(_rel(g, r) for g, r in zip(got[2:], ref[2:])) < grad_tol
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].shape == k.shape


def test_tiling_leaves_other_blocks_to_one_call_and_keeps_nan_rows(monkeypatch):
    calls = _spy(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    # (B, H, S, D) memory seen as (B, S, H, D): its (B, S) dims cannot be viewed as groups of tokens
    q, k, v, dout = (torch.randn(2, 2, 512, 16, generator=gen).transpose(1, 2) for _ in range(4))
    got, ref = _block_and_reference(q, k, v, dout)
    assert calls == {"forward": 0, "backward": 0}
    assert _rel(got[0], ref[0]) < 1e-5 and max(_rel(g, r) for g, r in zip(got[2:], ref[2:])) < 1e-4
    # short (511 < _CAUSAL_TILE_MIN) and bfloat16 blocks: one call
    for shape, dtype in (((1, 511, 2, 16), torch.float32), ((1, 512, 2, 16), torch.bfloat16)):
        t = torch.randn(shape, generator=gen).to(dtype)
        attention.attention_block(t, t, t, causal=True, backend="torch")
    assert calls["forward"] == 0
    # a NaN in one query row: that row's out and lse are NaN, every other row is untouched (tiled)
    q, k, v = (torch.randn(1, 1024, 2, 16, generator=gen) for _ in range(3))
    q[0, 700, 1, 3] = float("nan")
    out, lse = attention.attention_block(q, k, v, causal=True, backend="torch")
    assert calls["forward"] == 1
    nan_out, nan_lse = torch.isnan(out).any(-1), torch.isnan(lse)
    assert nan_out[0, 700, 1] and nan_lse[0, 1, 700]
    assert int(nan_out.sum()) == 1 and int(nan_lse.sum()) == 1


def _ring_tiled_case():
    calls = {"forward": 0}
    original = attention._tiled_causal_forward

    def counted(*args):
        calls["forward"] += 1
        return original(*args)

    attention._tiled_causal_forward = counted
    try:  # S = 1024 on 2 ranks: the step-0 block (512 local tokens, zigzag) is tiled
        err = check_against_reference("ring_attention", seq_len=1024, batch=1, h=2, h_kv=1, d=16)
    finally:
        attention._tiled_causal_forward = original
    return err, calls["forward"]


def test_ring_step_zero_block_tiled_matches_float64_reference():
    for err, tiled in run_distributed(_ring_tiled_case, 2):
        assert tiled == 1
        assert err["out"] < 1e-5 and max(err["dq"], err["dk"], err["dv"]) < 1e-4, err
