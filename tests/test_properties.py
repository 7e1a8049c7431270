"""Property-based tests (hypothesis) of the SP ops against the float64 reference, and numerical edge cases.

The example budget is small by default to keep the suite fast; SEQPAR_HYPOTHESIS_EXAMPLES=200 (or the
``long`` profile: HYPOTHESIS_PROFILE=long) runs a longer search.
"""

import os

import torch
import torch.distributed as dist
from tests.checks import rel_err
from tests.harness import run_distributed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.sp_cases import check_against_reference, global_inputs, global_rel_err

from seqpar.collectives import ring_attention, ulysses_attention
from seqpar.collectives.layout import pad_for_layout, shard_sequence
from seqpar.kernels.reference import reference_attention

# The default profile is derandomized so CI sees the same examples every run; the long profile searches afresh.
settings.register_profile("default", max_examples=int(os.environ.get("SEQPAR_HYPOTHESIS_EXAMPLES", "6")), deadline=None,
                          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

WORLD_SIZES = [1, 2, 3, 4, 8]  # the harness keeps one pool per size; other sizes would each start a new pool
SOFTMAX_OPS = ["ring_attention", "ulysses_attention", "allgather_kv_attention"]


@st.composite
def softmax_cases(draw):
    p = draw(st.sampled_from(WORLD_SIZES))
    op = draw(st.sampled_from(SOFTMAX_OPS))
    layout = draw(st.sampled_from(["zigzag", "contiguous"]))
    h_kv = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 4]))
    h = h_kv * group
    if op == "ulysses_attention" and h % p:
        h = p * max(1, h // p) if p <= 8 else h
        h_kv = next(x for x in (h, 4, 2, 1) if h % x == 0 and x <= h)
    multiple = 2 * p if layout == "zigzag" else p
    case = dict(h=h, h_kv=h_kv, d=draw(st.sampled_from([16, 32])), causal=draw(st.booleans()), layout=layout)
    if draw(st.booleans()):
        case["lens"] = [multiple * draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 5)))]
    else:
        case.update(batch=draw(st.integers(1, 2)), seq_len=multiple * draw(st.integers(1, 4)))
    return p, op, case


@given(softmax_cases(), st.integers(0, 2**16))
def test_softmax_ops_match_reference_on_random_shapes(case, seed):
    p, op, kwargs = case
    results = run_distributed(check_against_reference, p, op, seed=seed, **kwargs)
    # unit-scale inputs give O(1) gradients per element; 1e-2 of that is the floor for exactly-zero gradients
    errors = {name: global_rel_err(results, name, floor_per_element=1e-2) for name in ("out", "dq", "dk", "dv")}
    assert errors["out"] < 1e-5 and max(errors["dq"], errors["dk"], errors["dv"]) < 1e-4, (p, op, kwargs, errors)
    assert all(r["finite"] for r in results)


def large_logits_and_bf16_long():
    p = dist.get_world_size()
    big = check_against_reference("ring_attention", seed=3, batch=1, seq_len=2 * p * 8, h=2, h_kv=2, d=32, scale=1e3)
    large = check_against_reference("ring_attention", seed=3, batch=1, seq_len=2 * p * 8, h=2, h_kv=2, d=32, scale=30.0)
    long_bf16 = check_against_reference("ring_attention", seed=4, batch=1, seq_len=1024, h=2, h_kv=1, d=32,
                                        dtype=torch.bfloat16)
    return big, large, long_bf16


def test_huge_logits_and_long_bfloat16_stay_finite_and_within_contract():
    results = run_distributed(large_logits_and_bf16_long, 4)
    large_all = [r[1] for r in results]
    # scale 30 (logits ~170): the gradient is ill-conditioned in float32 (the single-device float32 kernel
    # itself is off by ~6e-5), so the bound is on the whole tensor, where it holds at the contract's 1e-4
    for name in ("out", "dq", "dk", "dv"):
        assert global_rel_err(large_all, name) < (1e-5 if name == "out" else 1e-4), name
    for big, large, long_bf16 in results:
        # scale 1e3 makes logits of magnitude ~5e3 and softmax one-hot: the output stays within the contract and
        # nothing overflows. Gradients there are beyond float32 (logits rounded by ~5e3 * 6e-8 = 3e-4; dq and dk
        # are pure cancellation, their true value ~0), so for them only finiteness is asserted
        assert big["out"] < 1e-5 and big["finite"], big
        assert large["finite"]
        assert long_bf16["out"] < 2e-2 and max(long_bf16["dq"], long_bf16["dk"], long_bf16["dv"]) < 2e-2, long_bf16


def length_one_sequences():
    p = dist.get_world_size()
    lens = [1, 7, 1, 12, 1]
    q, k, v, _, cu = global_inputs(11, batch=None, seq_len=None, h=4, h_kv=2, d=16, lens=lens)
    ref, _ = reference_attention(q, k, v, causal=True, cu_seqlens=cu)
    padded = [pad_for_layout(t, world_size=p, cu_seqlens=cu) for t in (q, k, v)]
    local = [shard_sequence(x.tensor, cu_seqlens=x.cu_seqlens) for x in padded]
    ref_padded = pad_for_layout(ref, world_size=p, cu_seqlens=cu).tensor
    ref_local, _ = shard_sequence(ref_padded, cu_seqlens=padded[0].cu_seqlens)
    real_local, _ = shard_sequence(padded[0].real_mask, cu_seqlens=padded[0].cu_seqlens)
    outs = {}
    for name, op in (("ring", ring_attention), ("ulysses", ulysses_attention)):
        out = op(*(t[0].float() for t in local), causal=True, cu_seqlens=local[0][1])
        outs[name] = (rel_err(out[real_local], ref_local[real_local]), bool(torch.isfinite(out).all()))
    return outs


def test_length_one_sequences_in_a_packed_batch():
    for outs in run_distributed(length_one_sequences, 2):
        for name, (err, finite) in outs.items():
            assert finite and err < 1e-5, (name, err)


def linear_case(op_name, seed, s_local, kind, with_init, with_final, dv):
    from tests.test_lasp2 import make_inputs, reference, run_case

    x = make_inputs(seed, dist.get_world_size(), s_local, kind, with_init, dv)
    ref = reference(x, with_final)
    whole = {n: ref["grads"][n] for n in ("log_decay", "initial_state") if x[n] is not None and x[n].dim() in (1, 4)}
    return run_case(op_name, x, ref, with_final), whole


@given(
    st.sampled_from(WORLD_SIZES), st.sampled_from(["lasp2", "zeco"]), st.integers(1, 9),
    st.sampled_from(["none", "head", "token"]), st.booleans(), st.booleans(), st.sampled_from([4, 8, 12]),
    st.integers(0, 2**16),
)
def test_linear_ops_match_the_recurrence_on_random_shapes(p, op_name, s_local, kind, with_init, with_final, dv, seed):
    per_rank = run_distributed(linear_case, p, op_name, seed, s_local, kind, with_init, with_final, dv)
    for res, _ in per_rank:
        for name, err in res["errors"].items():
            assert err < (1e-5 if name in ("o", "final") else 1e-4), (p, op_name, s_local, kind, name, err)
    for name, ref in per_rank[0][1].items():  # whole-held inputs: the partial gradients sum to the full one
        total = sum(res["partial"][name] for res, _ in per_rank)
        assert rel_err(total, ref) < 1e-4, (name, rel_err(total, ref))
