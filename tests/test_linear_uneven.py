"""LASP-2 and ZeCO on unequal shards (ranks holding different local lengths, cut from one global sequence)
equal the float64 recurrence for every decay kind (none, per head, per token, GLA per key dimension), with and
without initial / final states, in float64 (1e-10) and float32 (1e-5 outputs, 1e-4 gradients), gradients
included. Per-head decay on unequal shards was silently wrong in LASP-2 (each rank's total decay is S_r * g)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed
from tests.linear_cases import KINDS, assert_all_match, global_problem, reference, run_sp, whole_held_reference

LOCAL_LENGTHS = {3: [5, 8, 3], 4: [9, 2, 6, 1]}


def uneven_cases(op_name: str) -> list:
    p = dist.get_world_size()
    lengths = LOCAL_LENGTHS[p]
    cuts = [[0] + torch.tensor(lengths).cumsum(0).tolist()]
    results = []
    for i, kind in enumerate(KINDS):
        for with_init, with_final in ((False, False), (True, True), (False, True)):
            seqs = global_problem(10 * i + with_init + 2 * with_final, [sum(lengths)], 2, kind, with_init)
            ref = reference(seqs, with_final)
            for dtype in (torch.float64, torch.float32):
                res = run_sp(op_name, seqs, ref, cuts, packed=False, with_final=with_final, dtype=dtype,
                             chunk_size=4)
                case = (op_name, kind, with_init, with_final, str(dtype))
                results.append((case, dtype, res, whole_held_reference(seqs, ref)))
    return results


@pytest.mark.parametrize("world_size", [3, 4])
@pytest.mark.parametrize("op_name", ["lasp2", "zeco"])
def test_unequal_shards_equal_the_float64_recurrence(op_name, world_size):
    assert_all_match(run_distributed(uneven_cases, world_size, op_name))


# ------------------------------------------------------------------------------------------------------
# The GLA (per-key) kernel pieces the SP ops build on
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_torch_kernel_with_gla_decay_equals_the_float64_recurrence(chunk_size):
    from tests.checks import rel_err
    from seqpar.kernels.linear import chunk_state, linear_attention_chunk
    from seqpar.kernels.reference import reference_linear_attention

    gen = torch.Generator().manual_seed(chunk_size)
    b, s, h, dk, dv = 2, 11, 2, 4, 3
    q, k = (torch.randn(b, s, h, dk, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64, requires_grad=True)
    g = (-torch.rand(b, s, h, dk, generator=gen, dtype=torch.float64)).requires_grad_(True)
    init = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64, requires_grad=True)
    w, u = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64), torch.randn(b, h, dk, dv, generator=gen,
                                                                                       dtype=torch.float64)
    o, final = linear_attention_chunk(q, k, v, log_decay=g, initial_state=init, output_final_state=True,
                                      chunk_size=chunk_size, backend="torch")
    ro, rf = reference_linear_attention(q, k, v, log_decay=g, initial_state=init)
    assert rel_err(o, ro) < 1e-12 and rel_err(final, rf) < 1e-12
    got = torch.autograd.grad((o * w).sum() + (final * u).sum(), (q, k, v, g, init))
    ref = torch.autograd.grad((ro * w).sum() + (rf * u).sum(), (q, k, v, g, init))
    for name, x, y in zip("q k v g init".split(), got, ref):
        assert rel_err(x, y) < 1e-12, name
    _, zero_init_final = reference_linear_attention(q, k, v, log_decay=g)
    assert rel_err(chunk_state(k, v, g), zero_init_final) < 1e-12
    # the per-key decay differs from its mean per head: the kernel must not collapse it
    _, head_final = reference_linear_attention(q, k, v, log_decay=g.mean(-1))
    assert rel_err(final, head_final) > 1e-3



def triton_gla_cases() -> list:
    """GLA on the Triton kernel (the interpreter here): LASP-2 and ZeCO call it for every output piece."""
    p = dist.get_world_size()
    lengths = LOCAL_LENGTHS[p]
    cuts = [[0] + torch.tensor(lengths).cumsum(0).tolist()]
    seqs = global_problem(7, [sum(lengths)], 2, "key", True)
    ref = reference(seqs, True)
    results = []
    for op_name in ("lasp2", "zeco"):
        res = run_sp(op_name, seqs, ref, cuts, packed=False, with_final=True, dtype=torch.float32, chunk_size=16,
                     backend="triton")
        results.append(((op_name, "key", "triton"), torch.float32, res, whole_held_reference(seqs, ref)))
    return results


def test_gla_on_the_triton_kernel_equals_the_float64_recurrence():
    pytest.importorskip("triton", reason="triton not installed")
    assert_all_match(run_distributed(triton_gla_cases, 3))
