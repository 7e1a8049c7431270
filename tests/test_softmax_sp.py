"""Ring, Ulysses and all-gather-KV attention on real gloo ranks against the float64 single-device reference,
with exact communication volumes, the overlap schedule, and bad input."""

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err, value_errors
from tests.harness import run_distributed
from tests.sp_cases import check_matrix, global_inputs, measure_bytes, softmax_op

from seqpar.collectives import allgather_kv_attention, ring_attention, ulysses_attention
from seqpar.collectives.layout import pad_for_layout, shard_indices, shard_sequence
from seqpar.kernels.reference import reference_attention
from seqpar.tracing import trace_events

OPS = ["ring_attention", "ulysses_attention", "allgather_kv_attention"]
WORLD_SIZES = [1, 2, 3, 4, 8]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op_name", OPS)
def test_matches_float64_reference(op_name, world_size):
    for rank, cases in enumerate(run_distributed(check_matrix, world_size, op_name, seed=world_size)):
        for case, err in cases:
            bf16 = case.get("dtype") == torch.bfloat16
            out_tol, grad_tol = (2e-2, 2e-2) if bf16 else (1e-5, 1e-4)
            assert err["dtype_ok"], case
            assert err["out"] < out_tol, (rank, case, err)
            assert max(err["dq"], err["dk"], err["dv"]) < grad_tol, (rank, case, err)


def expected_bytes(op_name, p, tokens, h, h_kv, d, b=4):
    """The analytic per-rank volumes from the module docstrings, written out independently here."""
    kv = 2 * tokens * h_kv * d
    if op_name == "ring_attention":
        return (p - 1) * kv * b, (p - 1) * kv * b + (p - 1) * kv * 4
    if op_name == "allgather_kv_attention":
        return (p - 1) * kv * b, (p - 1) * kv * b
    # ulysses: q and out move (P-1)/P of their bytes; rank j receives the kv heads its query heads read
    q_bytes = tokens * h * d * b * (p - 1) // p
    per_rank, group = h // p, h // h_kv
    needs = [len({x // group for x in range(j * per_rank, (j + 1) * per_rank)}) for j in range(p)]
    return needs, q_bytes, tokens, d, b


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("op_name", OPS)
def test_bytes_sent_equal_the_formula(op_name, world_size):
    h = 6 if world_size == 3 else 8
    results = run_distributed(measure_bytes, world_size, op_name, seq_len=2 * world_size * 3, h=h, h_kv=2, d=32)
    for rank, res in enumerate(results):
        tokens = res["local_tokens"]
        if op_name == "ulysses_attention":
            needs, q_bytes, tokens, d, b = expected_bytes(op_name, world_size, tokens, h, 2, 32)
            fwd = 2 * q_bytes + sum(2 * tokens * needs[j] * d * b for j in range(world_size) if j != rank)
            bwd = 2 * q_bytes + (world_size - 1) * 2 * tokens * needs[rank] * d * b  # dK/dV of the heads it received
            # K/V heads split evenly (H_kv % P == 0): dK and dV go back as two messages, each as the kernel wrote
            # it (no packing copy); replicated K/V heads travel as one message each way
            bwd_calls = 4 if 2 % world_size == 0 else 3
            assert res["fwd_calls"] == {"all_to_all": 3} and res["bwd_calls"] == {"all_to_all": bwd_calls}
        else:
            fwd, bwd = expected_bytes(op_name, world_size, tokens, h, 2, 32)
        assert (res["fwd"], res["bwd"]) == (fwd, bwd), (rank, res)


def ring_event_order(layout):
    q, k, v, dout, _ = global_inputs(0, batch=1, seq_len=2 * dist.get_world_size() * 2, h=2, h_kv=2, d=32)
    ql, kl, vl = (shard_sequence(t, layout=layout).float().requires_grad_(True) for t in (q, k, v))
    with trace_events() as fwd:
        out = ring_attention(ql, kl, vl, causal=True, layout=layout)
    with trace_events() as bwd:
        out.backward(shard_sequence(dout, layout=layout).float())
    keep = lambda events: [(e["kind"], e.get("op") or e.get("name"), e.get("sq", 0) * e.get("sk", 0)) for e in events]  # noqa: E731
    return keep(fwd), keep(bwd)


def _kv_sends_and_kernels(events, kernel_name):
    sends = [i for i, e in enumerate(events) if e[0] == "comm"]
    kernels = [i for i, e in enumerate(events) if e[0] == "kernel" and e[1] == kernel_name]
    return sends, kernels


def test_ring_issues_each_transfer_before_the_kernel_it_overlaps():
    p = 4
    for fwd, bwd in run_distributed(ring_event_order, p, "zigzag"):
        sends, kernels = _kv_sends_and_kernels(fwd, "attention_block_varlen")
        # K and V are two messages per hop (not packed into one buffer: that was a copy of both)
        assert len(sends) == 2 * (p - 1) and len(kernels) == p
        for step in range(p - 1):  # the K/V for step+1 is in flight while the kernel of step runs
            assert sends[2 * step + 1] < kernels[step]
        kv_sends = [i for i, e in enumerate(bwd) if e[0] == "comm"]
        bwd_kernels = [i for i, e in enumerate(bwd) if e[0] == "kernel"]
        assert len(kv_sends) == 4 * (p - 1) and len(bwd_kernels) == p  # K, V and their two accumulators
        assert kv_sends[1] < bwd_kernels[0]  # K/V of step 1 leave before step 0's kernel


def test_zigzag_balances_causal_work_and_contiguous_skips_masked_blocks():
    p = 4
    zigzag = run_distributed(ring_event_order, p, "zigzag")
    areas = [sum(a for kind, _, a in fwd if kind == "kernel") for fwd, _ in zigzag]
    assert len(set(areas)) == 1  # every rank the same q x k area
    contiguous = run_distributed(ring_event_order, p, "contiguous")
    kernel_counts = [sum(1 for kind, *_ in fwd if kind == "kernel") for fwd, _ in contiguous]
    assert kernel_counts == [1, 2, 3, 4]  # rank r sees shards 0..r only; the rest are skipped, not computed


def last_rank_loss(op_name):
    """Loss on the last rank's tokens only: rank 0's K/V still get their gradient, equal to the reference."""
    p = dist.get_world_size()
    q, k, v, dout, _ = global_inputs(5, batch=1, seq_len=2 * p * 3, h=4, h_kv=2, d=32)
    mask = torch.zeros(q.shape[1], dtype=torch.bool)
    mask[shard_indices(q.shape[1], p, p - 1, layout="zigzag")] = True
    dout = dout * mask[None, :, None, None]
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*leaves, causal=True)[0]
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    ql, kl, vl = (shard_sequence(t).float().requires_grad_(True) for t in (q, k, v))
    op = softmax_op(op_name)
    op(ql, kl, vl, causal=True).backward(shard_sequence(dout).float())
    ref_dk = shard_sequence(ref_grads[1])
    return rel_err(kl.grad, ref_dk), ref_dk.norm().item()


@pytest.mark.parametrize("op_name", OPS)
def test_gradient_reaches_rank_zero_keys_from_a_loss_on_the_last_rank(op_name):
    results = run_distributed(last_rank_loss, 4, op_name)
    assert results[0][1] > 0  # rank 0's keys really matter to the last rank's tokens
    assert all(err < 1e-4 for err, _ in results)


def padded_tail(op_name):
    p = dist.get_world_size()
    real = 2 * p * 3 - 5  # not a multiple of 2P
    q, k, v, dout, _ = global_inputs(9, batch=1, seq_len=real, h=4, h_kv=2, d=32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*leaves, causal=True)[0]
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    padded = [pad_for_layout(t, world_size=p) for t in (q, k, v, dout)]
    mask = padded[0].real_mask
    ql, kl, vl = (shard_sequence(x.tensor).float().requires_grad_(True) for x in padded[:3])
    op = softmax_op(op_name)
    out = op(ql, kl, vl, causal=True)
    out.backward(shard_sequence(padded[3].tensor).float())  # padded dout rows are zero
    local_mask = shard_sequence(mask[None, :, None, None].expand(1, -1, 1, 1)).flatten()
    full_ref = pad_for_layout(ref.detach(), world_size=p).tensor
    full_dk = pad_for_layout(ref_grads[1], world_size=p).tensor
    return (
        rel_err(out[:, local_mask], shard_sequence(full_ref)[:, local_mask]),
        rel_err(kl.grad[:, local_mask], shard_sequence(full_dk)[:, local_mask]),
        bool((kl.grad[:, ~local_mask] == 0).all() and (vl.grad[:, ~local_mask] == 0).all()),
    )


@pytest.mark.parametrize("op_name", OPS)
def test_tail_padding_changes_no_real_output_and_padded_kv_get_zero_gradient(op_name):
    for out_err, dk_err, pad_grads_zero in run_distributed(padded_tail, 4, op_name):
        assert out_err < 1e-5 and dk_err < 1e-4 and pad_grads_zero


def switch_strategies():
    q, k, v, _, _ = global_inputs(2, batch=1, seq_len=2 * dist.get_world_size() * 2, h=4, h_kv=2, d=32)
    ql, kl, vl = (shard_sequence(t).float() for t in (q, k, v))
    ops = (ring_attention, ulysses_attention, allgather_kv_attention, ring_attention)
    outs = [op(ql, kl, vl, causal=True) for op in ops]
    return torch.equal(outs[0], outs[3]), max(rel_err(o, outs[0]) for o in outs[1:3])


def test_switching_strategy_between_calls_keeps_no_stale_state():
    for same, diff in run_distributed(switch_strategies, 4):
        assert same and diff < 1e-6


def bad_calls(op_name):
    op = softmax_op(op_name)
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 2, 16)
    packed = torch.randn(8, 4, 16)
    packed_k = torch.randn(8, 2, 16)
    cases = {
        "k-shape": lambda: op(q, torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)),
        "k-dtype": lambda: op(q, k.double(), k.double()),
        "k-heads": lambda: op(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16)),
        "v-shape": lambda: op(q, k, torch.randn(1, 8, 1, 16)),  # a head dim of its own is allowed (MLA); heads not
        "q-odd-zigzag": lambda: op(q[:, :7], k[:, :7], k[:, :7]),
        "layout-unknown": lambda: op(q, k, k, layout="striped"),
        "cu_seqlens-total":
            lambda: op(packed, packed_k, packed_k, cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32)),
        "cu_seqlens-dtype": lambda: op(packed, packed_k, packed_k, cu_seqlens=torch.tensor([0, 4, 8])),
        "q-packed-without-cu_seqlens": lambda: op(packed, packed_k, packed_k),
        "group-not-member": lambda: (
            op(q, k, k, group=dist.new_group([0])) if dist.get_rank() != 0
            else (_ for _ in ()).throw(ValueError("group: skip on rank 0"))
        ),
    }
    if op_name == "ulysses_attention":
        cases["q-heads-vs-P"] = lambda: op(torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    return value_errors(cases)


@pytest.mark.parametrize("op_name", OPS)
def test_bad_input_is_a_value_error_on_every_rank_before_any_communication(op_name):
    # new_group is itself collective, so every rank creates it; only the non-members pass it in.
    for messages in run_distributed(bad_calls, 2, op_name, timeout=30):
        for name, message in messages.items():
            assert message is not None, name
            argument = name.split("-")[0]
            assert message.startswith(argument + ":") or message.startswith(argument[0] + ", "), (name, message)
        if "q-heads-vs-P" in messages:
            assert "ring_attention" in messages["q-heads-vs-P"]


def fused_merge_ring():
    from seqpar.kernels.fused_merge import has_fused_merge

    q, k, v, dout, _ = global_inputs(4, batch=1, seq_len=2 * dist.get_world_size() * 4, h=2, h_kv=1, d=32)
    fused = has_fused_merge("triton", q.device, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*leaves, causal=True)[0]
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    ql, kl, vl = (shard_sequence(t).float().requires_grad_(True) for t in (q, k, v))
    with trace_events() as events:
        out = ring_attention(ql, kl, vl, causal=True, backend="triton")
    out.backward(shard_sequence(dout).float())
    unfused_kernels = [e for e in events if e["kind"] == "kernel"]  # the unfused path records each block kernel
    grads = zip((ql.grad, kl.grad, vl.grad), ref_grads)
    errors = [rel_err(out, shard_sequence(ref))] + [rel_err(g, shard_sequence(r)) for g, r in grads]
    return fused, len(unfused_kernels), errors


def test_ring_merges_inside_the_kernel_when_the_backend_fuses_it():
    pytest.importorskip("triton", reason="triton not installed")
    for fused, unfused_kernels, errors in run_distributed(fused_merge_ring, 2):
        assert fused and unfused_kernels == 0
        assert errors[0] < 1e-5 and max(errors[1:]) < 1e-4, errors
