"""Any strides in, the right answer out; NaN in, NaN out (issue 14, items 1 and 8).

Strided inputs are views of a larger leaf tensor whose other elements are large junk (1e3 scale): a kernel that
ignores a stride reads junk (or past the end) and the result is far off. Three views, all valid inputs:

* ``head_dim_stride2``: ``leaf[..., ::2]`` (head dim stride 2);
* ``transposed``:       a (B, S, D, H) tensor viewed as (B, S, H, D) via ``transpose(-1, -2)``;
* ``batch_seq_slice``:  ``leaf[1::2, ::2]`` (every other batch row and token; packed input: ``leaf[1::2]``).

Every SP op at W = 1, 2, 3, 4 (usp at P = 4 when ``seqpar.collectives.usp`` exists) and every attention and
linear-attention backend (torch, Triton under the interpreter, the flash-attn wrapper over a stand-in for
flash-attn's kernels) is compared with the float64 reference: fp32 outputs within 1e-5, gradients within 1e-4
(relative), gradients landing in the leaf at the view's positions and nowhere else.

NaN: a NaN in q, k or v must reach the output rows that see it (a finite answer from NaN input is silent
corruption); rows of the other batch element stay finite and equal the reference.
"""

import importlib

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.sp_cases import global_inputs

from seqpar import collectives
from seqpar.collectives.layout import shard_sequence
from seqpar.kernels import flash_attn_backend
from seqpar.kernels.attention import (
    AttentionBackend,
    attention,
    attention_block,
    available_attention_backends,
)
from seqpar.kernels.fused_merge import attention_block_merge
from seqpar.kernels.linear import (
    available_linear_backends,
    chunk_state,
    linear_attention_chunk,
)
from seqpar.kernels.reference import reference_attention, reference_linear_attention

# the module (seqpar.kernels.attention is also the name of the function that package exports)
attention_module = importlib.import_module("seqpar.kernels.attention")

try:
    importlib.import_module("seqpar.collectives.usp")
    HAS_USP = True
except ImportError:
    HAS_USP = False

VIEWS = ("head_dim_stride2", "transposed", "batch_seq_slice")
OUT_TOL, GRAD_TOL = 1e-5, 1e-4
SOFTMAX_OPS = ["ring_attention", "token_ring_attention", "ulysses_attention", "allgather_kv_attention"]
LINEAR_OPS = ["lasp2_linear_attention", "zeco_linear_attention"]
WORLD_SIZES = [1, 2, 3, 4]
CPU = torch.device("cpu")
NAN = float("nan")


# ----------------------------------------------------------------------------------------------------
# Strided views over junk
# ----------------------------------------------------------------------------------------------------


def _junk(shape, seed):
    return 1e3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _select(kind, t):
    """The view of kind ``kind`` into leaf-shaped ``t`` (also used to read the view's part of the leaf's grad)."""
    if kind == "head_dim_stride2":
        return t[..., ::2]
    if kind == "transposed":
        return t.transpose(-1, -2)
    return t[1::2, ::2] if t.dim() >= 4 else t[1::2]


def strided_leaf(values, kind, *, dtype=torch.float32, seed=0):
    """``(leaf, view)``: a leaf tensor requiring grad and a view of it of kind ``kind`` equal to ``values``."""
    shape = list(values.shape)
    if kind == "head_dim_stride2":
        shape[-1] *= 2
    elif kind == "transposed":
        shape[-1], shape[-2] = shape[-2], shape[-1]
    else:
        shape[0] *= 2
        if values.dim() >= 4:
            shape[1] *= 2
    leaf = _junk(shape, seed)
    with torch.no_grad():
        _select(kind, leaf).copy_(values)
    leaf = leaf.to(dtype).requires_grad_(True)
    view = _select(kind, leaf)
    assert not view.is_contiguous() or view.numel() <= 1
    if kind != "batch_seq_slice":
        assert view.stride(-1) != 1  # the case the kernels mishandled
    return leaf, view


def grad_errors(leaf, kind, ref_grad):
    """(relative error of the grad at the view's positions, max |grad| everywhere else in the leaf)."""
    grad = leaf.grad
    rest = grad.clone()
    _select(kind, rest).zero_()
    return rel_err(_select(kind, grad), ref_grad), float(rest.abs().max())


# ----------------------------------------------------------------------------------------------------
# SP ops on gloo ranks: strided inputs
# ----------------------------------------------------------------------------------------------------


def _softmax_call(op_name):
    if op_name == "usp_attention":
        usp = importlib.import_module("seqpar.collectives.usp").usp_attention
        return lambda *a, **kw: usp(*a, ulysses_degree=2, **kw)
    return getattr(collectives, op_name)


def rank_softmax_strided(op_name, seed):
    """On every rank: each view kind, padded and packed, causal zigzag, GQA; errors against float64."""
    p = dist.get_world_size()
    h, h_kv, d = (6 if p == 3 else 4), 2, 8
    op = _softmax_call(op_name)
    results = []
    cases = [("padded", kind) for kind in VIEWS] + [("packed", kind) for kind in VIEWS if kind != "transposed"]
    for i, (form, kind) in enumerate(cases):
        lens = None if form == "padded" else [2 * p, 4 * p]
        q, k, v, dout, cu = global_inputs(seed + i, batch=2, seq_len=6 * p, h=h, h_kv=h_kv, d=d, lens=lens)
        ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref_out, _ = reference_attention(*ref_leaves, causal=True, cu_seqlens=cu)
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout)

        def shard(t, cu=cu):
            return shard_sequence(t) if cu is None else shard_sequence(t, cu_seqlens=cu)[0]

        local_cu = None if cu is None else shard_sequence(q, cu_seqlens=cu)[1]
        leaves, views = zip(*(strided_leaf(shard(t), kind, seed=100 + j) for j, t in enumerate((q, k, v))))
        out = op(*views, causal=True, layout="zigzag", cu_seqlens=local_cu)
        out.backward(shard(dout).float())
        errs = {"out": rel_err(out, shard(ref_out))}
        for name, leaf, ref_grad in zip(("dq", "dk", "dv"), leaves, ref_grads):
            errs[name], errs[name + "_elsewhere"] = grad_errors(leaf, kind, shard(ref_grad))
        results.append(((form, kind), errs))
    return results


def _linear_inputs(seed, p, s_local=7, b=2, h=2, dk=8, dv=6):
    gen = torch.Generator().manual_seed(seed)
    s = p * s_local
    x = {n: torch.randn(b, s, h, dim, generator=gen, dtype=torch.float64)
         for n, dim in (("q", dk), ("k", dk), ("v", dv))}
    x["log_decay"] = -torch.nn.functional.softplus(torch.randn(b, s, h, generator=gen, dtype=torch.float64))
    x["initial_state"] = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    x["w"] = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64)
    return x


def _linear_reference(x):
    names = ("q", "k", "v", "log_decay", "initial_state")
    leaves = {n: x[n].clone().requires_grad_(True) for n in names}
    o, _ = reference_linear_attention(
        leaves["q"], leaves["k"], leaves["v"], log_decay=leaves["log_decay"], initial_state=leaves["initial_state"]
    )
    grads = torch.autograd.grad((o * x["w"]).sum(), [leaves[n] for n in names])
    return o.detach(), dict(zip(names, grads))


def rank_linear_strided(op_name, seed):
    """On every rank: each view kind for q, k, v, the per-token log_decay and the initial state."""
    rank, p = dist.get_rank(), dist.get_world_size()
    op = getattr(collectives, op_name)
    results = []
    for i, kind in enumerate(VIEWS):
        x = _linear_inputs(seed + i, p)
        ref_o, ref_grads = _linear_reference(x)
        s_local = x["q"].shape[1] // p
        sl = slice(rank * s_local, (rank + 1) * s_local)
        local = {n: x[n][:, sl] for n in ("q", "k", "v", "log_decay")}
        local["initial_state"] = x["initial_state"]
        leaves, views = {}, {}
        for j, (name, value) in enumerate(local.items()):
            leaves[name], views[name] = strided_leaf(value, kind, seed=200 + j)
        o = op(views["q"], views["k"], views["v"], log_decay=views["log_decay"],
               initial_state=views["initial_state"])
        (o * x["w"][:, sl].float()).sum().backward()
        errs = {"out": rel_err(o, ref_o[:, sl])}
        for name in ("q", "k", "v", "log_decay"):
            errs["d" + name], errs["d" + name + "_elsewhere"] = grad_errors(leaves[name], kind, ref_grads[name][:, sl])
        # initial_state is held whole by every rank: its gradient is the sum of the ranks' partials
        partial = _select(kind, leaves["initial_state"].grad).double()
        rest = leaves["initial_state"].grad.clone()
        _select(kind, rest).zero_()
        errs["dinitial_state_elsewhere"] = float(rest.abs().max())
        results.append((kind, errs, partial, ref_grads["initial_state"]))
    return results


def _assert_small(errs, where):
    for name, err in errs.items():
        if name.endswith("_elsewhere"):
            assert err == 0.0, (where, name, errs)  # no gradient may land outside the view
        else:
            assert err < (OUT_TOL if name == "out" else GRAD_TOL), (where, name, errs)


SP_CASES = [(op, w) for op in SOFTMAX_OPS + LINEAR_OPS for w in WORLD_SIZES] + [("usp_attention", 4)]


@pytest.mark.parametrize("op_name,world_size", SP_CASES)
def test_sp_op_with_strided_inputs_equals_float64_reference(op_name, world_size):
    if op_name == "usp_attention" and not HAS_USP:
        pytest.skip("usp not present")
    if op_name in LINEAR_OPS:
        per_rank = run_distributed(rank_linear_strided, world_size, op_name, seed=world_size)
        for kind_index in range(len(VIEWS)):
            partial_sum = sum(results[kind_index][2] for results in per_rank)
            kind, _, _, ref_initial = per_rank[0][kind_index]
            assert rel_err(partial_sum, ref_initial) < GRAD_TOL, (op_name, kind)
        for rank, results in enumerate(per_rank):
            for kind, errs, _, _ in results:
                _assert_small(errs, (op_name, world_size, rank, kind))
        return
    for rank, results in enumerate(run_distributed(rank_softmax_strided, world_size, op_name, seed=world_size)):
        for case, errs in results:
            _assert_small(errs, (op_name, world_size, rank, case))


# ----------------------------------------------------------------------------------------------------
# SP ops on gloo ranks: NaN in, NaN out
# ----------------------------------------------------------------------------------------------------


def _nan_cases_softmax(h, h_kv):
    """(tensor, global token, head, dim or None for all): where a NaN goes, and the query rows/heads/dims that
    must then be NaN (causal: every query at or after the token, in every head reading that kv head)."""
    group = h // h_kv
    return [
        ("q", 3, 1, None, lambda s: (slice(3, 4), [1], slice(None))),
        ("k", 5, 0, None, lambda s: (slice(5, s), list(range(group)), slice(None))),
        ("v", 5, 1, 2, lambda s: (slice(5, s), list(range(group, 2 * group)), slice(2, 3))),
    ]


def rank_softmax_nan(op_name):
    p = dist.get_world_size()
    h, h_kv, d = 4, 2, 8
    op = _softmax_call(op_name)
    results = []
    # two lengths: aten's CPU kernel hid a NaN query row in some shapes only (local or gathered lengths <= 8)
    for s in (4 * p, 8 * p):
        for name, token, head, dim, affected in _nan_cases_softmax(h, h_kv):
            q, k, v, _, _ = global_inputs(7, batch=2, seq_len=s, h=h, h_kv=h_kv, d=d)
            x = {"q": q, "k": k, "v": v}
            x[name][0, token, head, slice(None) if dim is None else dim] = NAN
            ref_out, _ = reference_attention(q, k, v, causal=True)
            must_nan = torch.zeros(2, s, h, d, dtype=torch.bool)
            rows, heads, dims = affected(s)
            for hh in heads:
                must_nan[0, rows, hh, dims] = True
            out = op(*(shard_sequence(t).float() for t in (q, k, v)), causal=True, layout="zigzag")
            mine = shard_sequence(must_nan)
            results.append({
                "case": name,
                "seq_len": s,
                "nan_where_expected": bool(torch.isnan(out[mine]).all()),
                "expected_count": int(mine.sum()),
                "other_batch_finite": bool(torch.isfinite(out[1]).all()),
                "other_batch_err": rel_err(out[1], shard_sequence(ref_out)[1]),
            })
    return results


def rank_linear_nan(op_name):
    """NaN on a rank-0 token: its row (q), or its row and every later one on every rank (k, v: the state)."""
    rank, p = dist.get_rank(), dist.get_world_size()
    op = getattr(collectives, op_name)
    results = []
    for name, token, dim in (("q", 2, None), ("k", 2, None), ("v", 2, 3)):
        x = _linear_inputs(11, p)
        x[name][0, token, 0, slice(None) if dim is None else dim] = NAN
        ref_o, _ = reference_linear_attention(x["q"], x["k"], x["v"], log_decay=x["log_decay"])
        s, dv = x["q"].shape[1], x["v"].shape[-1]
        must_nan = torch.zeros(2, s, 2, dv, dtype=torch.bool)
        rows = slice(token, token + 1) if name == "q" else slice(token, s)
        must_nan[0, rows, 0, slice(None) if dim is None else dim] = True
        s_local = s // p
        sl = slice(rank * s_local, (rank + 1) * s_local)
        o = op(*(x[n][:, sl].float() for n in ("q", "k", "v")), log_decay=x["log_decay"][:, sl].float())
        mine = must_nan[:, sl]
        results.append({
            "case": name,
            "nan_where_expected": bool(torch.isnan(o[mine]).all()),
            "expected_count": int(mine.sum()),
            "other_batch_finite": bool(torch.isfinite(o[1]).all()),
            "other_batch_err": rel_err(o[1], ref_o[1, sl]),
        })
    return results


NAN_OPS = SOFTMAX_OPS + LINEAR_OPS + ["usp_attention"]


@pytest.mark.parametrize("op_name", NAN_OPS)
def test_nan_input_gives_nan_output_rows(op_name):
    if op_name == "usp_attention" and not HAS_USP:
        pytest.skip("usp not present")
    world_size = 4 if op_name == "usp_attention" else 2
    fn = rank_linear_nan if op_name in LINEAR_OPS else rank_softmax_nan
    counts = {}
    for rank, results in enumerate(run_distributed(fn, world_size, op_name)):
        for res in results:
            assert res["nan_where_expected"], (op_name, rank, res)
            assert res["other_batch_finite"] and res["other_batch_err"] < OUT_TOL, (op_name, rank, res)
            counts[res["case"]] = counts.get(res["case"], 0) + res["expected_count"]
    assert all(n > 0 for n in counts.values()) and len(counts) == 3, counts  # every case checked some rows


# ----------------------------------------------------------------------------------------------------
# Kernel backends
# ----------------------------------------------------------------------------------------------------

FAKE_FLASH = "flash_attn_wrapper"


def _flash_input_contract(*ts):
    """What flash-attn's kernels require of their inputs (flash_api.cpp's checks); the wrapper must deliver it."""
    for t in ts:
        assert t.stride(-1) == 1, "flash-attn: input tensor must have contiguous last dimension"
        assert t.shape[-1] % 8 == 0, "flash-attn: head dim must be a multiple of 8"


def _flash_lse(lse):
    return lse.masked_fill(torch.isneginf(lse), float("inf")).float()  # flash-attn: rows with no key give +inf


def _fake_fwd(q, k, v, dropout_p, softmax_scale, causal, **options):
    _flash_input_contract(q, k, v)
    out, lse = reference_attention(q.double(), k.double(), v.double(), causal=causal, scale=softmax_scale)
    return out.to(q.dtype), _flash_lse(lse), None, None


def _fake_bwd(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, softmax_scale, causal, **options):
    _flash_input_contract(dout, q, k, v, out, dq, dk, dv)
    with torch.enable_grad():  # called from inside an autograd backward, where grad mode is off
        leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        ref, _ = reference_attention(*leaves, causal=causal, scale=softmax_scale)
        grads = torch.autograd.grad(ref, leaves, dout.double())
    for target, grad in zip((dq, dk, dv), grads):
        target.copy_(grad)


def _fake_fwd_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, **options):
    _flash_input_contract(q, k, v)
    assert cu_q.is_contiguous() and cu_k.is_contiguous() and cu_q.dtype == torch.int32
    assert torch.equal(cu_q, cu_k)  # the stand-in's reference handles equal boundaries only
    out, lse = reference_attention(q.double(), k.double(), v.double(), causal=causal, scale=softmax_scale,
                                   cu_seqlens=cu_q)
    return out.to(q.dtype), _flash_lse(lse), None, None


def _fake_bwd_varlen(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale,
                     causal, **options):
    _flash_input_contract(dout, q, k, v, out, dq, dk, dv)
    assert cu_q.is_contiguous() and cu_k.is_contiguous()
    with torch.enable_grad():
        leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        ref, _ = reference_attention(*leaves, causal=causal, scale=softmax_scale, cu_seqlens=cu_q)
        grads = torch.autograd.grad(ref, leaves, dout.double())
    for target, grad in zip((dq, dk, dv), grads):
        target.copy_(grad)


@pytest.fixture
def flash_attn_wrapper(monkeypatch):
    """flash_attn_backend's own code (padding, contiguity, LSE convention, cu_seqlens) over a CPU stand-in for
    flash-attn's kernels that enforces their input contract, registered as a backend for this test only."""
    for name, fake in (("_FWD", _fake_fwd), ("_BWD", _fake_bwd), ("_FWD_VARLEN", _fake_fwd_varlen),
                       ("_BWD_VARLEN", _fake_bwd_varlen)):
        monkeypatch.setattr(flash_attn_backend, name, fake, raising=False)  # absent without flash-attn
    backend = AttentionBackend(
        name=FAKE_FLASH, forward=flash_attn_backend._forward, backward=flash_attn_backend._backward,
        supports=lambda device, dtype: True, forward_varlen=flash_attn_backend._forward_varlen,
        backward_varlen=flash_attn_backend._backward_varlen,
    )
    monkeypatch.setitem(attention_module._BACKENDS, FAKE_FLASH, backend)
    return FAKE_FLASH


def _cpu_attention_backends():
    """Every registered attention backend, as the CPU backend that runs its code: "triton" runs its kernels
    here under the interpreter, "flash_attn" (CUDA) the wrapper of FAKE_FLASH."""
    cover = {"torch": "torch", "triton": "triton", "flash_attn": FAKE_FLASH}
    registered = available_attention_backends()
    assert set(registered) <= set(cover), f"a new attention backend needs a strided test: {registered}"
    return sorted({cover[name] for name in registered} | {FAKE_FLASH})


ATTENTION_BACKENDS = _cpu_attention_backends()


def _backend_name(backend, request):
    return request.getfixturevalue("flash_attn_wrapper") if backend == FAKE_FLASH else backend


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_backend_with_strided_inputs(backend, kind, request):
    """Padded (Sq != Sk, causal, GQA, head dim 24: not a multiple of 16 nor of 8 after the stride) and packed
    (a strided cu_seqlens view too) forward and backward through ``attention``."""
    name = _backend_name(backend, request)
    gen = torch.Generator().manual_seed(3)
    b, sq, sk, h, h_kv, d = 2, 9, 13, 4, 2, 24
    q, dout = (torch.randn(b, sq, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, sk, h_kv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, causal=True)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    leaves, views = zip(*(strided_leaf(t, kind, seed=j) for j, t in enumerate((q, k, v))))
    out = attention(*views, causal=True, backend=name)
    out.backward(dout.float())
    errs = {"out": rel_err(out, ref)}
    for g, leaf, r in zip(("dq", "dk", "dv"), leaves, ref_grads):
        errs[g], errs[g + "_elsewhere"] = grad_errors(leaf, kind, r)
    _assert_small(errs, (backend, kind, "padded"))

    if kind == "transposed":
        return  # packed (T, H, D) transposed views are covered by the padded case's (H, D) transpose
    lens = [5, 11, 8]
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    cu_view = torch.zeros(8, dtype=torch.int32)[::2]  # a strided cu_seqlens: entry i at 2 * i
    cu_view.copy_(cu)
    tq, tk, tv, tdout = (torch.randn(sum(lens), hh, d, generator=gen, dtype=torch.float64)
                         for hh in (h, h_kv, h_kv, h))
    ref_leaves = [t.clone().requires_grad_(True) for t in (tq, tk, tv)]
    ref = reference_attention(*ref_leaves, causal=True, cu_seqlens=cu)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, tdout)
    leaves, views = zip(*(strided_leaf(t, kind, seed=10 + j) for j, t in enumerate((tq, tk, tv))))
    out = attention(*views, causal=True, backend=name, cu_seqlens_q=cu_view, cu_seqlens_k=cu_view)
    out.backward(tdout.float())
    errs = {"out": rel_err(out, ref)}
    for g, leaf, r in zip(("dq", "dk", "dv"), leaves, ref_grads):
        errs[g], errs[g + "_elsewhere"] = grad_errors(leaf, kind, r)
    _assert_small(errs, (backend, kind, "packed"))


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("backend", [b for b in ATTENTION_BACKENDS if b != FAKE_FLASH])
def test_fused_and_unfused_merge_with_strided_inputs_and_accumulators(backend, kind):
    """attention_block_merge (fused in the Triton epilogue, a second pass for torch) with strided q/k/v and a
    strided running (out, lse), folding two K/V blocks: equals attention over the union of the keys."""
    gen = torch.Generator().manual_seed(4)
    b, sq, h, h_kv, d = 2, 10, 4, 2, 16
    q = torch.randn(b, sq, h, d, generator=gen, dtype=torch.float64)
    ks = [torch.randn(b, n, h_kv, d, generator=gen, dtype=torch.float64) for n in (7, 5)]
    vs = [torch.randn(b, n, h_kv, d, generator=gen, dtype=torch.float64) for n in (7, 5)]
    ref, ref_lse = reference_attention(q, torch.cat(ks, 1), torch.cat(vs, 1))
    _, qv = strided_leaf(q, kind, seed=1)
    out, lse = attention_block_merge(qv, *(strided_leaf(t, kind, seed=2)[1] for t in (ks[0], vs[0])), None, None,
                                     backend=backend)
    # the running partial as strided views of junk-filled storage, as a caller might hold it
    _, out_view = strided_leaf(out.double(), kind, seed=5)
    lse_store = _junk((b, sq, h), 6).float()
    lse_view = lse_store.transpose(1, 2)  # (B, H, Sq) with the sequence dim strided
    lse_view.copy_(lse)
    out, lse = attention_block_merge(qv, *(strided_leaf(t, kind, seed=3)[1] for t in (ks[1], vs[1])),
                                     out_view.detach(), lse_view, backend=backend)
    assert rel_err(out, ref) < OUT_TOL and rel_err(lse, ref_lse) < OUT_TOL, (rel_err(out, ref), rel_err(lse, ref_lse))


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("backend", available_linear_backends())
def test_linear_backend_with_strided_inputs(backend, kind):
    """Every registered linear backend: strided q, k, v, per-token log_decay and initial state; output, final
    state and every gradient against the recurrence."""
    x = _linear_inputs(5, 1, s_local=37)  # 37: several chunks and a partial one
    names = ("q", "k", "v", "log_decay", "initial_state")
    ref_leaves = {n: x[n].clone().requires_grad_(True) for n in names}
    ref_o, ref_final = reference_linear_attention(
        ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], log_decay=ref_leaves["log_decay"],
        initial_state=ref_leaves["initial_state"],
    )
    u = torch.randn(ref_final.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref_o * x["w"]).sum() + (ref_final * u).sum(), list(ref_leaves.values()))
    leaves, views = {}, {}
    for j, n in enumerate(names):
        leaves[n], views[n] = strided_leaf(x[n], kind, seed=20 + j)
    o, final = linear_attention_chunk(
        views["q"], views["k"], views["v"], log_decay=views["log_decay"], initial_state=views["initial_state"],
        output_final_state=True, chunk_size=16, backend=backend,
    )
    ((o * x["w"].float()).sum() + (final * u.float()).sum()).backward()
    errs = {"out": rel_err(o, ref_o), "final": rel_err(final, ref_final.detach())}
    for n, r in zip(names, ref_grads):
        errs["d" + n], errs["d" + n + "_elsewhere"] = grad_errors(leaves[n], kind, r)
    _assert_small(errs, (backend, kind))


@pytest.mark.parametrize("kind", VIEWS)
def test_chunk_state_with_strided_inputs(kind):
    x = _linear_inputs(6, 1, s_local=19)
    _, ref_state = reference_linear_attention(x["q"], x["k"], x["v"], log_decay=x["log_decay"])
    views = [strided_leaf(x[n], kind, seed=30 + j)[1] for j, n in enumerate(("k", "v", "log_decay"))]
    assert rel_err(chunk_state(*views), ref_state) < OUT_TOL


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_backend_nan_input_gives_nan_rows(backend, request):
    """NaN in q (one row), k (one key), v (one element): the output rows that see it are NaN, and so are their
    LSEs for q and k (a NaN row is not a row that saw no key: -inf would be a silent answer again); the other
    batch element is untouched. Two lengths: aten's CPU kernel hid NaN query rows at short lengths only."""
    name = _backend_name(backend, request)
    gen = torch.Generator().manual_seed(8)
    b, h, d = 2, 2, 16
    for s in (7, 20):
        for target, token, dim in (("q", 4, None), ("k", 5, None), ("v", 5, 3)):
            x = {n: torch.randn(b, s, h, d, generator=gen, dtype=torch.float64) for n in ("q", "k", "v")}
            x[target][0, token, 1, slice(None) if dim is None else dim] = NAN
            out, lse = attention_block(*(x[n].float() for n in ("q", "k", "v")), causal=True, backend=name)
            rows = slice(token, token + 1) if target == "q" else slice(token, s)
            affected = out[0, rows, 1] if dim is None else out[0, rows, 1, dim]
            assert torch.isnan(affected).all(), (backend, s, target, out[0, :, 1, 0])
            if target != "v":
                assert torch.isnan(lse[0, 1, rows]).all(), (backend, s, target, lse[0, 1])
            ref, ref_lse = reference_attention(*(x[n][1:] for n in ("q", "k", "v")), causal=True)
            assert rel_err(out[1:], ref) < OUT_TOL and rel_err(lse[1:], ref_lse) < OUT_TOL, (backend, s, target)


@pytest.mark.parametrize("backend", available_linear_backends())
def test_linear_backend_nan_input_gives_nan_rows(backend):
    for target, dim in (("q", None), ("k", None), ("v", 2)):
        x = _linear_inputs(12, 1, s_local=40)
        x[target][0, 5, 1, slice(None) if dim is None else dim] = NAN
        o, _ = linear_attention_chunk(*(x[n].float() for n in ("q", "k", "v")), log_decay=x["log_decay"].float(),
                                      chunk_size=16, backend=backend)
        rows = slice(5, 6) if target == "q" else slice(5, None)
        affected = o[0, rows, 1] if dim is None else o[0, rows, 1, dim]
        assert torch.isnan(affected).all(), (backend, target)
        ref, _ = reference_linear_attention(*(x[n][1:] for n in ("q", "k", "v")), log_decay=x["log_decay"][1:])
        assert rel_err(o[1:], ref) < OUT_TOL, (backend, target)
