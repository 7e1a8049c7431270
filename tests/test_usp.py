"""USP (Ulysses inside consecutive ranks x ring across them) on real gloo ranks: the float64 reference at P = 4
(2x2) and P = 8 (2x4, 4x2), the same output shards as ring attention, exact bytes, bad input, its registry
entry, and ``parallelize(model, strategy="usp")``."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err, value_errors
from tests.harness import run_distributed
from tests.sp_cases import global_inputs

from seqpar import strategies
from seqpar.collectives import count_comm, ring_attention
from seqpar.collectives.groups import split_consecutive, subgroup
from seqpar.collectives.layout import shard_sequence
from seqpar.collectives.usp import usp_attention
from seqpar.kernels.reference import reference_attention
from seqpar.tracing import trace_events
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------------------------------------------
# against the float64 reference
# ---------------------------------------------------------------------------------------------------


def run_case(*, u, seed=0, batch=1, seq_len=None, lens=None, h=8, h_kv=2, d=16, causal=True, layout="zigzag",
             dtype=torch.float32, op=usp_attention, group=None, backend="auto"):
    """This rank's relative errors (out, dq, dk, dv) against the float64 reference on the unsharded inputs, and
    its output shard and gradients."""
    q, k, v, dout, cu = global_inputs(seed, batch=batch, seq_len=seq_len, h=h, h_kv=h_kv, d=d, lens=lens)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, _ = reference_attention(*leaves, causal=causal, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)

    def shard(t):
        if cu is None:
            return shard_sequence(t, group=group, layout=layout)
        return shard_sequence(t, group=group, layout=layout, cu_seqlens=cu)[0]

    local_cu = None if cu is None else shard_sequence(q, group=group, layout=layout, cu_seqlens=cu)[1]
    ql, kl, vl = (shard(t).to(dtype).requires_grad_(True) for t in (q, k, v))
    options = {} if op is ring_attention else {"ulysses_degree": u}
    out = op(ql, kl, vl, group=group, causal=causal, layout=layout, cu_seqlens=local_cu, backend=backend, **options)
    out.backward(shard(dout).to(dtype))
    errors = {"out": rel_err(out, shard(ref_out))}
    for name, got, ref in zip(("dq", "dk", "dv"), (ql.grad, kl.grad, vl.grad), ref_grads):
        errors[name] = rel_err(got, shard(ref))
    errors["dtype_ok"] = out.dtype == dtype and ql.grad.dtype == dtype
    return errors, [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)]


def reference_cases(world_size):
    p = world_size
    if p == 4:  # u = 2, r = 2, and the two 1-D ends
        cases = [{"u": 2, "batch": 2, "seq_len": 2 * p * 3, "causal": causal, "layout": layout}
                 for causal in (True, False) for layout in ("zigzag", "contiguous")]
        cases += [
            {"u": 2, "batch": 1, "seq_len": 2 * p * 4, "h_kv": 1, "d": 32},  # GQA, one K/V head for all
            {"u": 2, "batch": 1, "seq_len": 2 * p * 2, "h_kv": 8, "causal": False},  # MHA
            # one sequence, contiguous: the all-to-all already delivers the ring's order (no gather)
            {"u": 2, "batch": 1, "seq_len": 2 * p * 3, "h_kv": 2, "layout": "contiguous"},
            {"u": 2, "batch": 1, "seq_len": 2 * p * 2, "h": 6, "h_kv": 3},  # a rank's query heads straddle K/V heads
            {"u": 2, "lens": [2 * p * m for m in (1, 3, 2, 5, 1)], "h_kv": 2},  # packed varlen, zigzag
            {"u": 2, "lens": [p * m for m in (2, 1, 4, 3, 1)], "h_kv": 1, "layout": "contiguous"},  # packed varlen
            {"u": 2, "batch": 1, "seq_len": 2 * p * 4, "dtype": torch.bfloat16},
            {"u": None, "batch": 1, "seq_len": 2 * p * 2},  # the default degree (2 here)
            {"u": 1, "batch": 1, "seq_len": 2 * p * 2},  # pure ring
            {"u": 4, "batch": 1, "seq_len": 2 * p * 2},  # pure Ulysses
        ]
        return cases
    # P = 8: few cases per split (the machine is small), each covering several features
    cases = []
    for u in (2, 4):
        cases += [
            {"u": u, "batch": 2, "seq_len": 2 * p * 2, "h_kv": 2, "causal": True, "layout": "zigzag"},
            {"u": u, "batch": 1, "seq_len": p * 3, "h_kv": 1, "causal": False, "layout": "contiguous"},
            {"u": u, "lens": [2 * p * m for m in (2, 1, 3)], "h_kv": 2, "causal": True, "layout": "zigzag"},
            {"u": u, "lens": [p * m for m in (3, 1, 2)], "h_kv": 1, "causal": True, "layout": "contiguous"},
        ]
    # u=4 with H=12, H_kv=3: inner ranks read 1, 2, 2, 1 K/V heads, two of them irregularly
    cases.append({"u": 4, "batch": 1, "seq_len": 2 * p * 2, "h": 12, "h_kv": 3, "causal": True, "layout": "zigzag"})
    return cases


def check_reference_cases():
    world_size = dist.get_world_size()
    results = [(case, run_case(seed=i, **case)[0]) for i, case in enumerate(reference_cases(world_size))]
    if world_size == 8:  # USP over a sub-group, as a plan's SP group runs it: ranks {0..3} and {4..7}, 2x2 each
        first = dist.get_rank() // 4 * 4
        half = subgroup(None, range(first, first + 4))
        for i, case in enumerate(SUBGROUP_CASES):
            results.append((case, run_case(seed=100 + i, group=half, **case)[0]))
    return results


SUBGROUP_CASES = [
    {"u": 2, "batch": 1, "seq_len": 24, "h_kv": 2, "causal": True, "layout": "zigzag"},
    {"u": 2, "lens": [8, 24, 16], "h_kv": 1, "causal": True, "layout": "zigzag"},
]


@pytest.mark.parametrize("world_size", [4, 8])
def test_matches_float64_reference(world_size):
    results = run_distributed(check_reference_cases, world_size)
    for rank, cases in enumerate(results):
        assert len(cases) == len(reference_cases(world_size)) + (len(SUBGROUP_CASES) if world_size == 8 else 0)
        for case, err in cases:
            bf16 = case.get("dtype") == torch.bfloat16
            out_tol, grad_tol = (2e-2, 2e-2) if bf16 else (1e-5, 1e-4)
            assert err["dtype_ok"], case
            assert err["out"] < out_tol, (rank, case, err)
            assert max(err["dq"], err["dk"], err["dv"]) < grad_tol, (rank, case, err)


def triton_case():
    # the ring part on the Triton kernels (interpreted on the CPU); they fuse the merge into the kernel, so the
    # forward records no separate block kernel, which the torch backend would
    with trace_events() as events:
        err = run_case(u=2, seed=7, lens=[16, 8], h=4, h_kv=2, causal=True, backend="triton")[0]
    unfused = [e for e in events if e["kind"] == "kernel" and e["name"] == "attention_block_varlen"]
    return err, len(unfused)


def test_kernel_backend_reaches_the_ring_part():
    pytest.importorskip("triton", reason="triton not installed")
    for rank, (err, unfused) in enumerate(run_distributed(triton_case, 4)):
        assert unfused == 0, rank
        assert err["out"] < 1e-5 and max(err["dq"], err["dk"], err["dv"]) < 1e-4, (rank, err)


# ---------------------------------------------------------------------------------------------------
# same tokens, same results as ring attention
# ---------------------------------------------------------------------------------------------------


def usp_and_ring_on_the_same_shards():
    results = []
    for layout in ("zigzag", "contiguous"):
        case = {"u": 2, "seed": 3, "lens": [32, 8, 16], "h": 8, "h_kv": 2, "causal": True, "layout": layout}
        usp_err, usp_tensors = run_case(**case)
        ring_err, ring_tensors = run_case(**case, op=ring_attention)
        diffs = [rel_err(a, b) for a, b in zip(usp_tensors, ring_tensors)]
        results.append((layout, usp_err, ring_err, diffs))
    return results


def test_each_rank_gets_the_output_shard_ring_attention_gives_it():
    for rank, results in enumerate(run_distributed(usp_and_ring_on_the_same_shards, 4)):
        for layout, usp_err, ring_err, diffs in results:
            for err in (usp_err, ring_err):
                assert err["out"] < 1e-5 and max(err["dq"], err["dk"], err["dv"]) < 1e-4, (rank, layout, err)
            # out, dq, dk, dv of this rank's tokens: the same up to float32 rounding
            assert max(diffs) < 1e-5, (rank, layout, diffs)


def usp_forward_events(u):
    q, k, v, _, _ = global_inputs(0, batch=1, seq_len=2 * dist.get_world_size() * 2, h=4, h_kv=2, d=32)
    ql, kl, vl = (shard_sequence(t).float() for t in (q, k, v))
    with trace_events() as events:
        usp_attention(ql, kl, vl, ulysses_degree=u, causal=True)
    return [(e["kind"], e.get("op") or e.get("name"), e.get("sq", 0) * e.get("sk", 0)) for e in events]


def test_ring_part_overlaps_each_transfer_with_a_kernel_and_balances_causal_work():
    p, u = 8, 2
    r = p // u
    results = run_distributed(usp_forward_events, p, u)
    for events in results:
        comms = [(i, op) for i, (kind, op, _) in enumerate(events) if kind == "comm"]
        kernels = [i for i, (kind, *_) in enumerate(events) if kind == "kernel"]
        # q and K/V all-to-alls, then the ring's r - 1 K/V sends (K and V two messages each), then the output's
        assert [op for _, op in comms] == ["all_to_all"] * 2 + ["send"] * 2 * (r - 1) + ["all_to_all"], comms
        assert len(kernels) == r  # zigzag: no block of the ring is skipped
        sends = [i for i, op in comms if op == "send"]
        for step in range(r - 1):  # the K/V of step + 1 is in flight while the kernel of step runs
            assert sends[2 * step + 1] < kernels[step], events
    areas = [sum(area for kind, _, area in events if kind == "kernel") for events in results]
    assert len(set(areas)) == 1, areas  # every rank attends the same query x key area


# ---------------------------------------------------------------------------------------------------
# work per step, which the machine's load does not change: the Ulysses part adds two copies per tensor each
# way (the permute into the send buffer, the gather into ring order) to what the ring itself does
# ---------------------------------------------------------------------------------------------------

DATA_MOVES = {"copy_", "clone", "contiguous", "_to_copy", "cat", "stack", "index", "index_select", "index_copy_",
              "index_put_", "index_add_", "zeros", "zeros_like", "new_zeros", "full", "fill_"}


class CountDataMoves(TorchDispatchMode):
    """Counts the ops that write at least ``min_numel`` elements of new data: copies, gathers, scatters, fills
    (what the 1.7x allocation of issue 19 was made of). Arithmetic and views are not counted."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.count = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if func.overloadpacket.__name__ in DATA_MOVES and isinstance(first, torch.Tensor):
            self.count += first.numel() >= self.min_numel
        return out


def data_moves(op, q, k, v, dout, **options) -> tuple[int, int]:
    """(forward, backward) data moves of one call of ``op`` after a warm-up call (cached groups and orders)."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    op(*leaves, causal=True, **options).backward(dout)
    min_numel = k.numel()  # the smallest tensor either layer moves: a K shard (the ring's K has as many)
    with CountDataMoves(min_numel) as forward:
        out = op(*leaves, causal=True, **options)
    with CountDataMoves(min_numel) as backward:
        out.backward(dout)
    return forward.count, backward.count


def usp_and_ring_data_moves(layout):
    u, h, h_kv, d = 2, 4, 2, 16
    q, k, v, dout, _ = global_inputs(5, batch=1, seq_len=2 * dist.get_world_size() * 4, h=h, h_kv=h_kv, d=d)
    usp = data_moves(usp_attention, *(shard_sequence(t, layout=layout).float() for t in (q, k, v, dout)),
                     layout=layout, ulysses_degree=u)
    # the ring part alone: ring_attention over the outer group on what USP hands it (u local shards' tokens,
    # H/u query heads and H_kv/u K/V heads)
    _, outer = split_consecutive(None, u)
    tokens = u * q.shape[1] // dist.get_world_size()
    ring_inputs = [torch.randn(1, tokens, heads, d) for heads in (h // u, h_kv // u, h_kv // u, h // u)]
    ring = data_moves(ring_attention, *ring_inputs, group=outer, layout=layout)
    return usp, ring


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ulysses_part_moves_each_tensor_twice_each_way(layout):
    # q, k, v forward and out backward: permute + gather; out forward and dq, dk, dv backward: gather + permute.
    # With one sequence in the contiguous layout the all-to-all delivers the ring's order: q is received as the
    # ring's q and out is sent as the ring made it (one move fewer each way); K and V are still split out.
    per_way = 8 if layout == "zigzag" else 6
    for rank, (usp, ring) in enumerate(run_distributed(usp_and_ring_data_moves, 4, layout)):
        assert usp == (ring[0] + per_way, ring[1] + per_way), (rank, usp, ring)


# ---------------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------------


def kv_heads_read(h, h_kv, u, j):
    """The K/V heads that inner rank j's query heads [j*H/u, (j+1)*H/u) read."""
    per_rank, group = h // u, h // h_kv
    return sorted({x // group for x in range(j * per_rank, (j + 1) * per_rank)})


def expected_bytes(rank, p, u, tokens, h, h_kv, d, b, acc=4):
    """The module docstring's per-rank volumes, written out independently: Ulysses on the u consecutive ranks
    + ring on the r = P/u inner groups (u*T tokens, the K/V heads the ring carries)."""
    r, i = p // u, rank % u
    n = [len(kv_heads_read(h, h_kv, u, j)) for j in range(u)]
    per_rank = h // u
    used = [x // (h // h_kv) for x in range(i * per_rank, (i + 1) * per_rank)]  # K/V head of each query head
    ratio = per_rank // n[i]
    regular = per_rank % n[i] == 0 and all(x - used[0] == t // ratio for t, x in enumerate(used))
    m = n[i] if regular else per_rank
    q_piece = tokens * per_rank * d * b  # what goes to each inner peer of q (and of out)
    ulysses_fwd = 2 * (u - 1) * q_piece + sum(2 * tokens * n[j] * d * b for j in range(u) if j != i)
    ulysses_bwd = 2 * (u - 1) * q_piece + (u - 1) * 2 * tokens * n[i] * d * b
    ring_fwd = (r - 1) * 2 * (u * tokens) * m * d * b
    ring_bwd = (r - 1) * 2 * (u * tokens) * m * d * (b + acc)
    return ulysses_fwd + ring_fwd, ulysses_bwd + ring_bwd


def measure_bytes(u, *, seq_len, h, h_kv, d, layout="zigzag", dtype=torch.float32):
    q, k, v, dout, _ = global_inputs(1, batch=2, seq_len=seq_len, h=h, h_kv=h_kv, d=d)
    ql, kl, vl = (shard_sequence(t, layout=layout).to(dtype).requires_grad_(True) for t in (q, k, v))
    with count_comm() as fwd:
        out = usp_attention(ql, kl, vl, ulysses_degree=u, causal=True, layout=layout)
    with count_comm() as bwd:
        out.backward(shard_sequence(dout, layout=layout).to(dtype))
    return {"fwd": fwd.bytes_sent, "bwd": bwd.bytes_sent, "fwd_calls": fwd.calls, "bwd_calls": bwd.calls,
            "tokens": ql.shape[0] * ql.shape[1]}


BYTES_CASES = [
    (4, 2, {"h": 8, "h_kv": 2, "d": 32}),
    (4, 2, {"h": 6, "h_kv": 3, "d": 16}),  # the ring carries 3 expanded K/V heads, the all-to-all 2
    (4, 2, {"h": 8, "h_kv": 2, "d": 32, "dtype": torch.bfloat16}),
    (8, 2, {"h": 8, "h_kv": 2, "d": 32}),
    (8, 4, {"h": 8, "h_kv": 2, "d": 32, "layout": "contiguous"}),
    (8, 4, {"h": 12, "h_kv": 3, "d": 16}),  # inner ranks read 1, 2, 2, 1 K/V heads: bytes differ per rank
]


def measure_bytes_cases():
    world_size = dist.get_world_size()
    return [measure_bytes(u, seq_len=2 * world_size * 3, **case) for p, u, case in BYTES_CASES if p == world_size]


@pytest.mark.parametrize("world_size", [4, 8])
def test_bytes_sent_equal_the_formula(world_size):
    cases = [(u, case) for p, u, case in BYTES_CASES if p == world_size]
    results = run_distributed(measure_bytes_cases, world_size)
    for index, (u, case) in enumerate(cases):
        b = torch.tensor([], dtype=case.get("dtype", torch.float32)).element_size()
        measured = [per_rank[index] for per_rank in results]
        for rank, res in enumerate(measured):
            want = expected_bytes(rank, world_size, u, res["tokens"], case["h"], case["h_kv"], case["d"], b)
            assert (res["fwd"], res["bwd"]) == want, (rank, u, case, res)
            # three all-to-alls on the inner group each way; the ring's K/V (and dK/dV) sends on the outer one
            assert res["fwd_calls"]["all_to_all"] == 3 and res["bwd_calls"]["all_to_all"] == 3, res
        if u == strategies.usp_ulysses_degree(world_size, case["h"]):  # the registry's degree: its formula too
            shape = strategies.LayerShape(seq_len=measured[0]["tokens"] * world_size, degree=world_size,
                                          heads=case["h"], kv_heads=case["h_kv"], head_dim=case["d"], elem_bytes=b)
            busiest = max(measured, key=lambda res: res["fwd"] + res["bwd"])
            assert strategies.get("usp").comm_bytes(shape) == (busiest["fwd"], busiest["bwd"]), (u, case)


def test_bytes_at_the_1d_ends_are_ring_and_ulysses():
    # u = 1: ring over P ranks; u = P: Ulysses over P ranks. The general formula covers both.
    results = run_distributed(measure_bytes_ends, 4)
    for rank, (ring_like, ulysses_like) in enumerate(results):
        tokens = ring_like["tokens"]
        assert (ring_like["fwd"], ring_like["bwd"]) == expected_bytes(rank, 4, 1, tokens, 8, 2, 32, 4)
        assert (ulysses_like["fwd"], ulysses_like["bwd"]) == expected_bytes(rank, 4, 4, tokens, 8, 2, 32, 4)
        assert "all_to_all" not in ring_like["fwd_calls"] and "send" not in ulysses_like["fwd_calls"]


def measure_bytes_ends():
    return [measure_bytes(u, seq_len=24, h=8, h_kv=2, d=32) for u in (1, 4)]


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


def bad_calls():
    q = torch.randn(1, 16, 8, 16)
    k = torch.randn(1, 16, 2, 16)
    q6 = torch.randn(1, 16, 6, 16)
    with count_comm() as stats:
        messages = value_errors({
            "ulysses_degree-not-dividing-P": lambda: usp_attention(q, k, k, ulysses_degree=3),
            "ulysses_degree-above-P": lambda: usp_attention(q, k, k, ulysses_degree=8),
            "ulysses_degree-zero": lambda: usp_attention(q, k, k, ulysses_degree=0),
            "ulysses_degree-not-int": lambda: usp_attention(q, k, k, ulysses_degree=2.0),
            "ulysses_degree-heads": lambda: usp_attention(q6, k, k, ulysses_degree=4),
            "k-shape": lambda: usp_attention(q, torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), ulysses_degree=2),
        })
    return messages, stats.bytes_sent, dict(stats.calls)


def test_bad_input_is_a_value_error_on_every_rank_before_any_communication():
    results = run_distributed(bad_calls, 4, timeout=60)
    assert len(results) == 4
    for messages, sent, calls in results:
        for name, message in messages.items():
            assert message is not None and message.startswith(name.split("-")[0] + ":"), (name, message)
        assert "6 query heads" in messages["ulysses_degree-heads"]
        assert "does not divide the group size 4" in messages["ulysses_degree-not-dividing-P"]
        assert sent == 0 and calls == {}


def disagreeing_ulysses_degree():
    q = torch.randn(1, 16, 8, 16)
    k = torch.randn(1, 16, 2, 16)
    u = 2 if dist.get_rank() < 2 else 4  # both valid at P = 4, but the ranks must pass the same one
    return value_errors({"ulysses_degree": lambda: usp_attention(q, k, k, ulysses_degree=u)})["ulysses_degree"]


def test_ranks_passing_different_ulysses_degrees_fail_together():
    for message in run_distributed(disagreeing_ulysses_degree, 4, timeout=60):
        assert message is not None and message.startswith("usp_attention:") and "ulysses_degree" in message


# ---------------------------------------------------------------------------------------------------
# the registry entry (pure Python)
# ---------------------------------------------------------------------------------------------------


def test_default_degree_is_the_largest_divisor_below_p_that_splits_the_heads():
    degree = strategies.usp_ulysses_degree
    assert [degree(p, 8) for p in (1, 2, 4, 6, 8, 16)] == [1, 1, 2, 2, 4, 8]
    assert degree(8, 6) == 2 and degree(12, 6) == 6 and degree(4, 3) == 1 and degree(5, 8) == 1


def test_registry_entry_validity_and_op():
    usp = strategies.get("usp", "softmax")
    assert usp.load_op() is usp_attention and usp.min_degree == 4
    assert usp.valid(4, 8, 2) and usp.valid(8, 12, 3) and usp.valid(8, 32, 8)
    assert not usp.valid(2, 8, 2)  # below min_degree
    for degree, heads in ((4, 3), (5, 10), (7, 7)):  # no 1 < u < P divides both: it would be plain ring
        assert not usp.valid(degree, heads, 1)
        assert "use ring" in usp.invalid_reason(degree, heads, 1)


def test_registry_time_and_memory_terms():
    usp = strategies.get("usp")
    S = np.array([4096.0, 32768.0])
    shape = strategies.LayerShape(seq_len=S, degree=8, heads=8, kv_heads=2, head_dim=64, elem_bytes=2)
    fwd, bwd = usp.comm_bytes(shape)
    s, u, r = S / 8, 4, 2
    # written out: q + out on 4 inner ranks, 1 K/V head each, then a ring of 2 on 4*s tokens with 1 K/V head
    assert np.array_equal(fwd, 2 * 3 * s * 2 * 64 * 2 + 3 * 2 * s * 64 * 2 + 2 * (u * s) * 64 * 2)
    assert np.array_equal(bwd, 2 * 3 * s * 2 * 64 * 2 + 3 * 2 * s * 64 * 2 + 2 * (u * s) * 64 * 6)
    # zero compute and latency: the time is the bytes over the bandwidth, forward and backward
    beta = 1e9
    zero = np.zeros_like(S)
    assert np.allclose(usp.layer_time(shape, zero, zero, strategies.Link(beta, 0.0)), (fwd + bwd) / beta, rtol=1e-12)
    # free links: the ring's transfers hide behind compute and the all-to-alls cost nothing
    a_f, a_b = S * 1e-6, S * 2e-6
    assert np.allclose(usp.layer_time(shape, a_f, a_b, strategies.Link(math.inf, 0.0)), a_f + a_b, rtol=1e-12)
    # latency only: 4 per inner step and pass (as Ulysses is charged), 1 per ring step and pass
    t = usp.layer_time(shape, zero, zero, strategies.Link(math.inf, 1e-3))
    assert np.allclose(t, 2 * 4 * (u - 1) * 1e-3 + 2 * (r - 1) * 1e-3, rtol=1e-12)
    # slow link: the ring step is bounded by its transfer, not its kernel
    slow = usp.layer_time(shape, a_f, a_b, strategies.Link(1e6, 0.0))
    assert np.all(slow > usp.layer_time(shape, a_f, a_b, strategies.Link(1e12, 0.0)))
    memory = usp.transient_bytes(shape)
    # head-sharded q, out (s*H*D) and k, v (4s tokens, 1 head) with gradients; ring buffers K/V + fp32 dK/dV
    assert np.array_equal(memory, 2 * (2 * s * 8 * 64 * 2 + 2 * u * s * 64 * 2) + 2 * 2 * u * s * 64 * 6)


# ---------------------------------------------------------------------------------------------------
# parallelize
# ---------------------------------------------------------------------------------------------------


def llama_usp_matches_one_process():
    import copy

    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    import seqpar

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 96, (n,), generator=gen) for n in (128, 128)]

    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("eager")
    total, count = 0.0, 0
    for seq in sequences:
        logits = ref(input_ids=seq[None], use_cache=False).logits
        total = total + F.cross_entropy(logits[0, :-1].double(), seq[1:], reduction="sum")
        count += seq.numel() - 1
    ref_loss = total / count
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

    sp_model = seqpar.parallelize(model, strategy="usp")
    local = sp_model.prepare({"input_ids": torch.stack(sequences)})
    out = sp_model(**local)
    out.loss.backward()
    sp_model.sync_gradients()
    grad_errors = {n: rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads}
    missing = [n for n, p in model.named_parameters() if n in ref_grads and p.grad is None]
    return abs(out.loss.item() - ref_loss.item()) / abs(ref_loss.item()), max(grad_errors.values()), missing


def test_parallelize_llama_with_usp_equals_one_process():
    pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")
    for loss_err, grad_err, missing in run_distributed(llama_usp_matches_one_process, 4):
        assert loss_err < 1e-5 and grad_err < 1e-4 and not missing, (loss_err, grad_err, missing)
