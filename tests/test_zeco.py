"""ZeCO linear-attention SP: the same contract as LASP-2 (rank functions shared with test_lasp2.py), its own
byte formula (one state per direction), and the pipelined relay order of the All-Scan."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.harness import run_distributed
from seqpar.collectives.zeco import final_state_tree, zeco_linear_attention
from seqpar.tracing import trace_events
from tests.test_lasp2 import (
    B,
    DK,
    H,
    WORLD_SIZES,
    assert_bad_inputs_raise_everywhere,
    assert_matches_reference,
    bad_inputs,
    bytes_for_lengths,
    check_against_reference,
    make_inputs,
)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_zeco_equals_the_float64_recurrence(world_size):
    per_rank = run_distributed(check_against_reference, world_size, ["zeco"], 5, {})
    assert_matches_reference(per_rank)


def test_zeco_with_uneven_pieces_and_one_piece():
    for pieces in (3, 1):
        per_rank = run_distributed(check_against_reference, 3, ["zeco"], 4, {"zeco": {"num_pieces": pieces}})
        assert_matches_reference(per_rank)


def zeco_bytes(p: int, rank: int, final: bool, dv: int, e: int = 4) -> tuple[int, int]:
    state = B * H * DK * dv * e
    last = p - 1
    _, children = final_state_tree(rank, p)  # the final state goes down a binomial tree from rank P - 1
    fwd = (rank < last) * state + final * len(children) * state
    bwd = (rank > 0) * state + (final and rank < last) * state
    return fwd, bwd


@pytest.mark.parametrize("world_size", [1, 4])
def test_zeco_bytes_equal_the_formula_and_do_not_grow_with_length(world_size):
    pieces = 3
    for rank, got in enumerate(run_distributed(bytes_for_lengths, world_size, "zeco", {"num_pieces": pieces})):
        for (kind, final, s_local), (fwd, bwd, fwd_calls, bwd_calls) in got.items():
            assert (fwd, bwd) == zeco_bytes(world_size, rank, final, 4), (rank, kind, final, s_local)
            assert (fwd, bwd) == got[(kind, final, 8)][:2]  # S doubled: same bytes
            last = world_size - 1
            sends_fwd = pieces * (rank < last) + final * len(final_state_tree(rank, world_size)[1])
            sends_bwd = pieces * (rank > 0) + (final and rank < last)
            assert fwd_calls == ({"send": sends_fwd} if sends_fwd else {})
            assert bwd_calls == ({"send": sends_bwd} if sends_bwd else {})


def zeco_event_order(pieces: int):
    p, rank = dist.get_world_size(), dist.get_rank()
    x = make_inputs(3, p, 8, "token", False, 4)
    sl = slice(rank * 8, (rank + 1) * 8)
    q, k, v = (x[n][:, sl].float().requires_grad_(True) for n in ("q", "k", "v"))
    g = x["log_decay"][:, sl].float().requires_grad_(True)
    with trace_events() as fwd:
        o = zeco_linear_attention(q, k, v, log_decay=g, num_pieces=pieces)
    with trace_events() as bwd:
        o.sum().backward()

    def order(events):
        return [(e["kind"], e.get("name") or e.get("op") or e.get("what"), e.get("piece")) for e in events]

    return order(fwd), order(bwd)


def test_zeco_relays_each_piece_before_the_next_one_is_waited_for():
    pieces = 4
    fwd, bwd = run_distributed(zeco_event_order, 3, pieces)[1]  # the middle rank receives and forwards
    assert fwd[0] == ("kernel", "zeco.local_state", None)  # the state pass first, then the scan and intra work
    waits = [i for i, e in enumerate(fwd) if e[0] == "wait" and "receive" in e[1]]
    sends = [i for i, e in enumerate(fwd) if e == ("comm", "send", None)]
    assert len(waits) == len(sends) == pieces
    for j in range(pieces):  # piece j arrives and leaves at once, before piece j + 1 is waited for
        assert waits[j] < sends[j] and (j + 1 == pieces or sends[j] < waits[j + 1])
    assert sends[-1] < fwd.index(("kernel", "zeco.inter", None))
    bwd_sends = [i for i, e in enumerate(bwd) if e == ("comm", "send", None)]
    assert bwd_sends[-1] < bwd.index(("kernel", "zeco.state_backward", None))
    assert sum(e == ("comm", "send", None) for e in bwd) == pieces  # one state back to rank 0


def test_zeco_scan_starts_before_the_intra_chunk_work_forward_and_backward():
    """The paper's overlap: the scan's first send precedes the intra-chunk kernel on the rank where the scan
    starts (rank 0 forward, rank P - 1 backward), and on every rank the cheap state pass precedes the intra work."""
    p = 4
    per_rank = run_distributed(zeco_event_order, p, 2)
    for rank, (fwd, bwd) in enumerate(per_rank):
        assert fwd.index(("kernel", "zeco.local_state", None)) < fwd.index(("kernel", "zeco.intra", None))
        if rank == 0:
            first_send = fwd.index(("comm", "send", None))
            assert first_send < fwd.index(("kernel", "zeco.intra", None)), fwd
            assert sum(e == ("comm", "send", None) for e in fwd[:fwd.index(("kernel", "zeco.intra", None))]) == 2
        if rank == p - 1:
            first_send = bwd.index(("comm", "send", None))
            assert first_send < bwd.index(("kernel", "zeco.intra_backward", None)), bwd
        if 0 < rank < p - 1:  # a middle rank forwards every piece before its inter term, after receiving it
            sends = [i for i, e in enumerate(fwd) if e == ("comm", "send", None)]
            assert len(sends) == 2 and sends[-1] < fwd.index(("kernel", "zeco.inter", None))


def test_final_state_tree_is_a_binomial_tree_rooted_at_the_last_rank():
    for p in (1, 2, 3, 5, 8, 13):
        depth = {p - 1: 0}
        received = {p - 1}
        for rank in sorted(range(p), key=lambda r: p - 1 - r):  # parents before children in relative order
            parent, children = final_state_tree(rank, p)
            assert (parent is None) == (rank == p - 1)
            if parent is not None:
                assert rank in final_state_tree(parent, p)[1] and parent in received
                depth[rank] = depth[parent] + 1
            received.update(children)
            assert len(children) <= max(1, (p - 1).bit_length())
        assert received == set(range(p))
        assert max(depth.values()) <= (p - 1).bit_length()  # at most ceil(log2 P) hops


def test_zeco_bad_input_raises_on_every_rank_before_any_transfer():
    assert_bad_inputs_raise_everywhere(run_distributed(bad_inputs, 2, "zeco"))
