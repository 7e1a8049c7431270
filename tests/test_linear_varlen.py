"""Packed variable-length linear attention in ONE SP call: N sequences, each cut in P equal parts (contiguous
layout, as seqpar.shard_sequence does) so that every sequence spans every rank; local ``cu_seqlens``; states
reset at sequence boundaries; per-sequence initial and final states; every decay kind. Equal to the float64
recurrence run on each sequence alone (outputs, final states, all gradients), with one collective per call."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed
from tests.linear_cases import KINDS, assert_all_match, global_problem, reference, run_sp, whole_held_reference
from seqpar.collectives import comm

LOCAL_LENGTHS = [3, 1, 6, 2]  # per rank and sequence: global lengths P * these


def varlen_cases(op_name: str) -> list:
    p = dist.get_world_size()
    cuts = [[r * n for r in range(p + 1)] for n in LOCAL_LENGTHS]
    results = []
    for i, kind in enumerate(KINDS):
        for with_init, with_final in ((False, False), (True, True)):
            seqs = global_problem(50 + 10 * i + with_init, [p * n for n in LOCAL_LENGTHS], 1, kind, with_init)
            ref = reference(seqs, with_final)
            for dtype in (torch.float64,) if kind != "key" else (torch.float64, torch.float32):
                res = run_sp(op_name, seqs, ref, cuts, packed=True, with_final=with_final, dtype=dtype,
                             chunk_size=2)
                case = (op_name, kind, with_init, with_final, str(dtype))
                results.append((case, dtype, res, whole_held_reference(seqs, ref)))
    return results


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("op_name", ["lasp2", "zeco"])
def test_packed_sequences_spanning_ranks_equal_the_float64_recurrence(op_name, world_size):
    assert_all_match(run_distributed(varlen_cases, world_size, op_name))


def packed_calls(op_name: str) -> tuple:
    """Transfers of one packed forward + backward with 4 sequences and a final state."""
    from tests.linear_cases import OPS

    p = dist.get_world_size()
    lens = torch.tensor([0] + LOCAL_LENGTHS).cumsum(0).to(torch.int32)
    q = torch.randn(1, int(lens[-1]), 2, 4, requires_grad=True)
    options = {"num_pieces": 2} if op_name == "zeco" else {}
    with comm.count_comm() as fwd:
        o, final = OPS[op_name](q, q, q, log_decay=torch.tensor([-0.1, -0.2]), cu_seqlens=lens,
                                output_final_state=True, **options)
    with comm.count_comm() as bwd:
        (o.sum() + final.sum() / p).backward()
    return dict(fwd.calls), dict(bwd.calls)


def test_one_collective_per_call_not_one_per_sequence():
    for fwd, bwd in run_distributed(packed_calls, 3, "lasp2"):
        assert fwd == {"all_gather": 1} and bwd == {"all_gather": 1}
    for rank, (fwd, bwd) in enumerate(run_distributed(packed_calls, 3, "zeco")):
        # one state (all sequences) in 2 pieces down the chain, plus the final state's tree
        assert set(fwd) <= {"send"} and set(bwd) <= {"send"}, (rank, fwd, bwd)
        assert fwd.get("send", 0) <= 2 + 2 and bwd.get("send", 0) <= 2 + 1, (rank, fwd, bwd)


def test_bad_cu_seqlens_raises_naming_it():
    from tests.linear_cases import OPS

    q = torch.randn(1, 6, 2, 4)
    for bad in (torch.tensor([0, 3, 6]), torch.tensor([0, 3, 5], dtype=torch.int32),
                torch.tensor([0, 3, 3, 6], dtype=torch.int32), torch.tensor([[0, 6]], dtype=torch.int32)):
        with pytest.raises(ValueError, match="^cu_seqlens:"):
            OPS["lasp2"](q, q, q, cu_seqlens=bad)
    with pytest.raises(ValueError, match="^initial_state:"):
        OPS["zeco"](q, q, q, cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32),
                    initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="^q:"):
        OPS["lasp2"](q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                     cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
