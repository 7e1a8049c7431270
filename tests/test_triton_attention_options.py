"""The Triton attention kernels' options against the float64 reference, on the CPU under the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1): sliding windows (shorter than a block, longer than the sequence, (left, 0)
and (left, right)), a value head dim != q/k's (MLA), packed varlen, the SP ops' explicit positions, sinks, the
blocks a window skips, a strided lse in the backward, "auto" on CUDA, and ring attention at P = 3 on the Triton
backend with a window.

Blocks are 16 wide under the interpreter, so a few dozen tokens cover first/middle/last and partial blocks.
Float32 tolerances are the contract's: 1e-5 outputs, 1e-4 gradients (relative norms; measured ~2e-7).
"""

import importlib.util

import pytest
import torch
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.sp_cases import check_against_reference

from seqpar.kernels.attention import (
    attention,
    attention_block,
    attention_block_backward,
    attention_block_varlen,
    attention_block_varlen_backward,
    get_attention_backend,
)
from seqpar.kernels.reference import reference_attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
TRITON = "triton"


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _reference(q, k, v, dout, **options):
    """Float64 (out, lse, (dq, dk, dv)) by the definition."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = reference_attention(*leaves, **options)
    return out.detach(), lse.detach(), torch.autograd.grad(out, leaves, dout)


def _check(out, lse, grads, ref_out, ref_lse, ref_grads, case):
    visible = torch.isfinite(ref_lse)  # rows that see a key; the others must give out 0, lse -inf
    assert torch.equal(torch.isfinite(lse), visible) and not torch.isnan(lse).any(), case
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse[visible], ref_lse[visible]) < 1e-5, case
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape and rel_err(g, r) < 1e-4, (case, name, rel_err(g, r))


@pytest.mark.parametrize(
    "sq,sk,d,dv,causal,window",
    [
        (33, 33, 16, 16, True, (5, 0)),  # window shorter than a block
        (33, 33, 24, 16, True, (40, -1)),  # longer than the sequence (hides nothing); MLA head dims
        (20, 45, 16, 16, True, (20, 0)),  # Sq < Sk: bottom-right aligned window spanning blocks
        (45, 20, 16, 24, False, (3, 9)),  # (left, right) without causal, Sq > Sk: rows past every key see none
        (40, 40, 24, 16, False, (2, 1)),  # a narrow band around the diagonal, no causal
    ],
)
def test_window_and_value_head_dim_match_reference(sq, sk, d, dv, causal, window):
    gen = torch.Generator().manual_seed(sq * 100 + sk + d)
    q, k, v = _rand(gen, 1, sq, 4, d), _rand(gen, 1, sk, 2, d), _rand(gen, 1, sk, 2, dv)
    dout = _rand(gen, 1, sq, 4, dv)
    ref = _reference(q, k, v, dout, causal=causal, window=window)
    q32, k32, v32 = q.float(), k.float(), v.float()
    out, lse = attention_block(q32, k32, v32, causal=causal, window=window, backend=TRITON)
    grads = attention_block_backward(dout.float(), q32, k32, v32, out, lse, causal=causal, window=window,
                                     backend=TRITON)
    assert out.shape == (1, sq, 4, dv) and lse.shape == (1, 4, sq)
    _check(out, lse, grads, *ref, (sq, sk, d, dv, causal, window))


def test_varlen_window_value_head_dim_and_sinks_through_autograd():
    """Packed sequences (one token, one empty, several blocks) with a window, softcap, D=24/Dv=16 and gpt-oss
    sinks, through ``attention`` (sinks enter after the kernels, as on every backend): out and every gradient,
    the sinks' included, equal the reference."""
    gen = torch.Generator().manual_seed(3)
    lens = [5, 1, 37, 0, 20]
    cu = _cu(lens)
    q, k, v = _rand(gen, sum(lens), 2, 24), _rand(gen, sum(lens), 1, 24), _rand(gen, sum(lens), 1, 16)
    sinks, dout = _rand(gen, 2), _rand(gen, sum(lens), 2, 16)
    options = dict(causal=True, window=(9, 0), softcap=2.0)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, sinks)]
    ref, _ = reference_attention(*leaves[:3], cu_seqlens=cu, sinks=leaves[3], **options)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    leaves32 = [x.float().requires_grad_(True) for x in (q, k, v, sinks)]
    out = attention(*leaves32[:3], sinks=leaves32[3], cu_seqlens_q=cu, cu_seqlens_k=cu, backend=TRITON, **options)
    grads = torch.autograd.grad(out, leaves32, dout.float())
    assert rel_err(out, ref) < 1e-5
    for name, g, r in zip(("dq", "dk", "dv", "sinks"), grads, ref_grads):
        assert rel_err(g, r) < 1e-4, name


def _zigzag_positions(chunk, chunks):
    """Positions of one zigzag shard of a sequence: two runs of ``chunk`` tokens (sorted, with a gap)."""
    first, second = chunks
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


@pytest.mark.parametrize("hinted", [False, True])
def test_explicit_positions_of_sp_shards_match_reference(hinted):
    """What ring/zigzag pass: packed q and k with the global positions of their shards (two runs each), a window
    and causal in those positions; with the ``max_seqlen`` hints (no host read) and without."""
    gen = torch.Generator().manual_seed(7)
    chunk = 12  # a sequence of 8 chunks (P = 4); q holds chunks (3, 4), k chunks (1, 6)
    q_pos, k_pos = _zigzag_positions(chunk, (3, 4)), _zigzag_positions(chunk, (1, 6))
    n = q_pos.numel()
    q, k, v, dout = _rand(gen, n, 2, 16), _rand(gen, n, 1, 16), _rand(gen, n, 1, 24), _rand(gen, n, 2, 24)
    options = dict(causal=True, window=(30, 0))
    ref = _reference(q[None], k[None], v[None], dout[None], q_positions=q_pos, k_positions=k_pos, **options)
    ref = (ref[0][0], ref[1][0], [g[0] for g in ref[2]])
    cu = _cu([n])
    packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, q_positions=q_pos, k_positions=k_pos, backend=TRITON,
                  **options, **(dict(max_seqlen_q=n, max_seqlen_k=n) if hinted else {}))
    q32, k32, v32 = q.float(), k.float(), v.float()
    out, lse = attention_block_varlen(q32, k32, v32, **packed)
    grads = attention_block_varlen_backward(dout.float(), q32, k32, v32, out, lse, **packed)
    _check(out, lse, grads, *ref, hinted)


@pytest.mark.parametrize("packed", [False, True])
def test_unsorted_positions_visit_every_block_and_stay_correct(packed):
    """Positions the binary search cannot use (keys in shuffled order): a flag the launcher computes on the device
    sends the kernels through every block, masked, instead of skipping: still the reference, padded and packed
    with the ``max_seqlen`` hints (where nothing is read on the host)."""
    gen = torch.Generator().manual_seed(9)
    s = 40
    order = torch.randperm(s, generator=gen)
    q, k, v, dout = _rand(gen, 1, s, 2, 16), _rand(gen, 1, s, 2, 16), _rand(gen, 1, s, 2, 16), _rand(gen, 1, s, 2, 16)
    q_pos, k_pos = torch.arange(s), order
    options = dict(causal=True, window=(6, 2))
    ref = _reference(q, k, v, dout, q_positions=q_pos, k_positions=k_pos, **options)
    q32, k32, v32, dout32 = q.float(), k.float(), v.float(), dout.float()
    if packed:
        cu = _cu([s])
        options.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s, q_positions=q_pos,
                       k_positions=k_pos)
        q32, k32, v32, dout32 = q32[0], k32[0], v32[0], dout32[0]
        ref = (ref[0][0], ref[1][0], [g[0] for g in ref[2]])
        forward, backward = attention_block_varlen, attention_block_varlen_backward
    else:
        options.update(q_positions=q_pos[None], k_positions=k_pos[None])
        forward, backward = attention_block, attention_block_backward
    out, lse = forward(q32, k32, v32, backend=TRITON, **options)
    grads = backward(dout32, q32, k32, v32, out, lse, backend=TRITON, **options)
    _check(out, lse, grads, *ref, packed)


@pytest.mark.parametrize("explicit", [False, True])
def test_blocks_outside_the_window_are_not_visited(explicit):
    """Causal window (5, 0) over 64 tokens (blocks of 16): a kernel that visits a block wholly outside the band
    (even masked: 0 * NaN) spreads a NaN planted there. Forward and dq: NaN in v of keys 0-15, which rows 32-63
    never see: their out and the dq of rows 32-47 stay finite and equal the reference. dK/dV: NaN in q and dout
    of rows 48-63, which see no key before 43: the dk/dv of keys 0-31 stay finite and equal the reference. With
    ``explicit`` the same through the positions' binary search."""
    gen = torch.Generator().manual_seed(1)
    s, window = 64, (5, 0)
    q, k, v, dout = (_rand(gen, 1, s, 2, 16) for _ in range(4))
    ref_out, _, ref_grads = _reference(q, k, v, dout, causal=True, window=window)
    options = dict(causal=True, window=window, backend=TRITON)
    if explicit:
        options.update(q_positions=torch.arange(s)[None], k_positions=torch.arange(s)[None])
    q32, k32, v32, dout32 = q.float(), k.float(), v.float(), dout.float()

    v_nan = v32.clone()
    v_nan[:, :16] = float("nan")
    out, lse = attention_block(q32, k32, v_nan, **options)
    dq = attention_block_backward(dout32, q32, k32, v_nan, out, lse, **options)[0]
    q_nan, dout_nan = q32.clone(), dout32.clone()
    q_nan[:, 48:] = dout_nan[:, 48:] = float("nan")
    out_nan, lse_nan = attention_block(q_nan, k32, v32, **options)
    _, dk, dv = attention_block_backward(dout_nan, q_nan, k32, v32, out_nan, lse_nan, **options)
    for got, ref in ((out[:, 32:], ref_out[:, 32:]), (dq[:, 32:48], ref_grads[0][:, 32:48]),
                     (dk[:, :32], ref_grads[1][:, :32]), (dv[:, :32], ref_grads[2][:, :32])):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 1e-4


def test_backward_takes_a_strided_lse():
    """The backward with lse views as the SP ops pass them (rows of a larger (H, T) lse: a slice; and an lse with
    transposed strides): the kernels read lse and their own delta each with its own strides, so the gradients
    equal the reference. (The kernels once read delta with lse's strides: wrong dq/dk for any strided lse.)"""
    gen = torch.Generator().manual_seed(4)
    lens = [9, 23]
    cu, t = _cu(lens), sum(lens)
    q, k, v, dout = _rand(gen, t, 2, 16), _rand(gen, t, 1, 16), _rand(gen, t, 1, 16), _rand(gen, t, 2, 16)
    ref_out, _, ref_grads = _reference(q, k, v, dout, causal=True, cu_seqlens=cu)
    q32, k32, v32 = q.float(), k.float(), v.float()
    packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend=TRITON)
    out, lse = attention_block_varlen(q32, k32, v32, **packed)
    wide = torch.full((2, t + 8), float("nan"))
    wide[:, 5:5 + t] = lse
    sliced = wide[:, 5:5 + t]  # strides (t + 8, 1)
    transposed = lse.t().contiguous().t()  # strides (1, 2)
    for lse_view in (sliced, transposed):
        assert not lse_view.is_contiguous() and torch.equal(lse_view, lse)
        grads = attention_block_varlen_backward(dout.float(), q32, k32, v32, out, lse_view, **packed)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert rel_err(g, r) < 1e-4, (lse_view.stride(), name)


def test_auto_picks_triton_on_cuda_for_window_positions_and_value_head_dim(monkeypatch):
    """On CUDA (compiled kernels), "auto" resolves to Triton for every option the kernels have now, unless
    flash-attn is there and has them (flash-attn has window and softcap, not positions or Dv != D)."""
    from seqpar.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "INTERPRETED", False)  # as on a GPU: auto-eligible on CUDA
    cuda = torch.device("cuda")
    assert {"window", "softcap", "positions", "value_head_dim"} <= get_attention_backend(TRITON, cuda,
                                                                                          torch.bfloat16).features
    for needs in (("window", "positions"), ("value_head_dim",), ("window", "softcap", "positions", "value_head_dim")):
        assert get_attention_backend("auto", cuda, torch.bfloat16, needs=needs).name == TRITON, needs
    assert get_attention_backend("auto", torch.device("cpu"), torch.float32, needs=("window",)).name == "torch"


def ring_triton_window_cases():
    cases = [
        dict(batch=1, seq_len=60, h=2, h_kv=1, d=24, dv=16, causal=True, layout="zigzag", window=(7, 0)),
        dict(lens=[12, 36], h=2, h_kv=1, d=16, causal=False, layout="zigzag", window=(5, 2), hint=True, sinks=True),
    ]
    return [check_against_reference("ring_attention", seed=i, op_options={"backend": TRITON}, **case)
            for i, case in enumerate(cases)]


def test_ring_at_three_ranks_runs_triton_with_a_window():
    """Ring attention at P = 3 on the Triton backend (float32, interpreter; its merge fused in the kernel) with
    windows (zigzag causal with MLA head dims; packed varlen with the hint, sinks and a (left, right) window
    without causal) against float64."""
    for rank_results in run_distributed(ring_triton_window_cases, 3):
        for i, err in enumerate(rank_results):
            assert err["finite"] and err["out"] < 1e-5, (i, err)
            assert max(err["dq"], err["dk"], err["dv"]) < 1e-4, (i, err)


def test_bad_options_raise_naming_the_argument():
    """The launcher's own checks (its public entry points take the options directly): before any kernel runs."""
    from seqpar.kernels.triton_attention import triton_attention_forward, triton_attention_forward_varlen

    q = torch.randn(1, 8, 2, 16)
    pos = torch.arange(8)[None]
    cu = _cu([8])
    band = dict(window=(2, 0))
    cases = {
        "window": lambda: triton_attention_forward(q, q, q, window=(-2, 0)),
        "softcap": lambda: triton_attention_forward(q, q, q, softcap=float("nan")),
        "q_positions": lambda: triton_attention_forward(q, q, q, q_positions=pos[:, :5], k_positions=pos, **band),
        "k_positions": lambda: triton_attention_forward(q, q, q, q_positions=pos, k_positions=pos * 1.0, **band),
        "k_positions ": lambda: triton_attention_forward(q, q, q, q_positions=pos),
        "q_positions ": lambda: triton_attention_forward_varlen(q[0], q[0], q[0], cu, cu, window=(2, 0),
                                                                q_positions=pos, k_positions=pos[0]),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError, match=f"^{name.strip()}:"):
            call()
