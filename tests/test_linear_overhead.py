"""No host syncs in LASP-2's and ZeCO's forward and backward (issue 17, item 5).

Method: a TorchFunctionMode sees every tensor method call made from Python; it counts the ones that make the
host wait for a tensor's value: ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``,
``t.__index__()`` (and ``.cpu()`` / ``.numpy()``, which a device tensor must sync for). On CPU these cost
nothing, but on a GPU each one stalls the launch queue, so counting them on CPU finds them for the GPU.
C++-internal syncs are invisible to the mode; the ops under test make none (no nonzero/masked_select).

The argument check (``prepare_linear_sp``) may sync: once for the log_decay value check (<= 0 and finite) and
once for reading ``cu_seqlens``; the test counts the check on its own and requires the whole forward to make
exactly those, and the backward none. At P > 1 the argument check also holds the cross-rank agreement check
(comm.check_agreement, on by default), which reads its inputs' hashes on the host. The P=1 timing against the
plain chunked kernel is in bench/linear_overhead.py (it needs a quiet machine to mean anything).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.harness import run_distributed
from seqpar.collectives.lasp2 import lasp2_linear_attention, prepare_linear_sp
from seqpar.collectives.zeco import zeco_linear_attention

SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class CountHostSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> list[str]:
    with CountHostSyncs() as mode:
        fn()
    return mode.calls


def test_the_counter_sees_host_syncs():
    t = torch.ones(3)
    assert count_syncs(lambda: (t.sum().item(), bool(t.any()), t.tolist(), int(t[0]))) == [
        "item", "__bool__", "tolist", "__int__"]


KINDS = {
    "none": None,
    "head": lambda b, s, h, dk: -torch.rand(h),
    "token": lambda b, s, h, dk: -torch.rand(b, s, h),
    "key": lambda b, s, h, dk: -torch.rand(b, s, h, dk),
}


def syncs_of_one_call(op_name: str, kind: str, packed: bool) -> tuple:
    """(argument-check syncs, forward syncs, backward syncs, gradients reached) for one call on this rank."""
    op = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}[op_name]
    torch.manual_seed(0)  # whole-held inputs equal on every rank
    b, s, h, dk = (1 if packed else 2), 40, 2, 8
    q, k, v = (torch.randn(b, s, h, dk, requires_grad=True) for _ in range(3))
    g = None if KINDS[kind] is None else KINDS[kind](b, s, h, dk).requires_grad_(True)
    options = {"cu_seqlens": torch.tensor([0, 13, 40], dtype=torch.int32)} if packed else {}
    init = torch.randn(2, h, dk, dk, requires_grad=True)
    check = count_syncs(lambda: prepare_linear_sp(
        q, k, v, g, init, group=None, scale=None, layout="contiguous", backend="torch", op=op_name,
        cu_seqlens=options.get("cu_seqlens")))
    out = {}
    fwd = count_syncs(lambda: out.update(r=op(q, k, v, log_decay=g, initial_state=init, output_final_state=True,
                                              chunk_size=16, backend="torch", **options)))
    o, final = out["r"]
    loss = o.square().sum() + final.sum()
    bwd = count_syncs(lambda: loss.backward())
    reached = q.grad is not None and init.grad is not None and (g is None or g.grad is not None)
    return check, fwd, bwd, reached


@pytest.mark.parametrize("world_size", [1, 2])
def test_no_host_syncs_in_forward_and_backward(world_size):
    cases = [(op, kind, packed) for op in ("lasp2", "zeco") for kind in KINDS for packed in (False, True)]
    per_rank = run_distributed(_all_cases, world_size, cases)
    for results in per_rank:
        for (op, kind, packed), (check, fwd, bwd, reached) in zip(cases, results):
            if world_size == 1:  # at P > 1 the argument check also runs the cross-rank agreement check
                assert len(check) == (kind != "none") + packed, (op, kind, packed, check)
            assert fwd == check, (op, kind, packed, fwd)
            assert bwd == [], (op, kind, packed, bwd)
            assert reached


def _all_cases(cases):
    return [syncs_of_one_call(*case) for case in cases]
