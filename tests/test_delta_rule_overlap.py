"""Delta-rule SP schedules (issue 20): the transfer of (A_r, B_r) is issued after the cheap state pass and before
the intra-chunk output pass, forward and backward (event order, as ZeCO's in tests/test_zeco.py), and the ops
make no host syncs beyond their argument check (the counter of tests/test_linear_overhead.py); the paths that keep
no local graphs (only the initial state needs a gradient; no_grad) still equal the float64 recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.collectives.delta_rule import _prepare, lasp2_delta_rule, zeco_delta_rule
from seqpar.tracing import trace_events
from tests.harness import run_distributed
from tests.test_delta_rule_sp import PER_TOKEN, make_problem
from tests.test_linear_overhead import count_syncs

OPS = {"lasp2": lasp2_delta_rule, "zeco": zeco_delta_rule}
SHARD = 8


def _local_inputs(p: int, rank: int, kind: str = "key") -> dict:
    x = make_problem(7, SHARD * p, p, kind, True, 3)
    sl = slice(rank * SHARD, (rank + 1) * SHARD)
    local = {n: x[n][:, sl].float().requires_grad_(True) for n in PER_TOKEN if x[n] is not None}
    local["initial_state"] = x["initial_state"].float().requires_grad_(True)
    return local


def event_order(op_name: str) -> tuple[list, list]:
    """(forward events, backward events) on this rank, as (kind, name or op or what)."""
    p, rank = dist.get_world_size(), dist.get_rank()
    x = _local_inputs(p, rank)
    options = {"num_pieces": 2} if op_name == "zeco" else {}
    with trace_events() as fwd:
        o, final = OPS[op_name](x["q"], x["k"], x["v"], x["beta"], log_decay=x["log_decay"],
                                initial_state=x["initial_state"], output_final_state=True, chunk_size=4, **options)
    with trace_events() as bwd:
        (o.square().sum() + final.sum()).backward()

    def order(events):
        return [(e["kind"], e.get("name") or e.get("op") or e.get("what")) for e in events]

    return order(fwd), order(bwd)


def _after(events: list, start: int, match) -> int:
    """Index of the first event after ``start`` that ``match`` accepts."""
    return next(i for i in range(start + 1, len(events)) if match(events[i]))


def test_lasp2_delta_rule_all_gathers_before_the_intra_chunk_work_forward_and_backward():
    for fwd, bwd in run_distributed(event_order, 3, "lasp2"):
        transition = fwd.index(("kernel", "delta_rule.transition"))
        intra = fwd.index(("kernel", "delta_rule.intra"))
        gather = _after(fwd, transition, lambda e: e == ("comm", "all_gather"))
        wait = _after(fwd, transition, lambda e: e[0] == "wait" and "all_gather" in e[1])
        assert transition < gather < intra < wait < fwd.index(("kernel", "delta_rule.inter")), fwd
        intra_b = bwd.index(("kernel", "delta_rule.intra_backward"))
        gather_b = bwd.index(("comm", "all_gather"))
        wait_b = _after(bwd, gather_b, lambda e: e[0] == "wait" and "all_gather" in e[1])
        assert gather_b < intra_b < wait_b < bwd.index(("kernel", "delta_rule.state_backward")), bwd


def test_zeco_delta_rule_scan_starts_before_the_intra_chunk_work_forward_and_backward():
    """The scan's first rank (0 forward, P - 1 backward) sends every piece before its intra-chunk work; every
    rank runs its state pass before the intra work and gets S_in after it (complete after intra)."""
    p = 4
    for rank, (fwd, bwd) in enumerate(run_distributed(event_order, p, "zeco")):
        transition = fwd.index(("kernel", "delta_rule.transition"))
        intra = fwd.index(("kernel", "delta_rule.intra"))
        assert transition < intra < fwd.index(("kernel", "delta_rule.inter")), fwd
        if rank == 0:
            sends = [i for i, e in enumerate(fwd) if e == ("comm", "send")]
            assert len([i for i in sends if transition < i < intra]) == 2, fwd  # both pieces, before intra
        intra_b = bwd.index(("kernel", "delta_rule.intra_backward"))
        assert intra_b < bwd.index(("kernel", "delta_rule.state_backward")), bwd
        if rank == p - 1:
            sends = [i for i, e in enumerate(bwd) if e == ("comm", "send")]
            assert len([i for i in sends if i < intra_b]) == 2, bwd  # lambda's pieces leave before intra


# ------------------------------------------------------------------------------------------------------
# Host syncs
# ------------------------------------------------------------------------------------------------------


def syncs_of_one_call(op_name: str, kind: str, packed: bool) -> tuple:
    """(argument-check syncs, forward syncs, backward syncs, gradients reached) for one call on this rank."""
    p, rank = dist.get_world_size(), dist.get_rank()
    x = _local_inputs(p, rank, kind)
    g = x.get("log_decay")
    init = x["initial_state"]
    options = {}
    if packed:  # two sequences, each with a piece on every rank
        options["cu_seqlens"] = torch.tensor([0, 3, SHARD], dtype=torch.int32)
        init = torch.cat([init.detach(), init.detach() * 0.5]).requires_grad_(True)
    check = count_syncs(lambda: _prepare(
        x["q"], x["k"], x["v"], x["beta"], g, init, group=None, scale=None, layout="contiguous", op=op_name,
        chunk_size=4, extra="output_final_state=True", cu_seqlens=options.get("cu_seqlens")))
    out = {}
    fwd = count_syncs(lambda: out.update(r=OPS[op_name](
        x["q"], x["k"], x["v"], x["beta"], log_decay=g, initial_state=init, output_final_state=True, chunk_size=4,
        **options)))
    o, final = out["r"]
    loss = o.square().sum() + final.sum()
    bwd = count_syncs(lambda: loss.backward())
    reached = all(t.grad is not None for t in (x["q"], x["k"], x["v"], x["beta"], init)) and (
        g is None or g.grad is not None)
    return check, fwd, bwd, reached


def _all_cases(cases):
    return [syncs_of_one_call(*case) for case in cases]


@pytest.mark.parametrize("world_size", [1, 2])
def test_no_host_syncs_in_delta_rule_forward_and_backward(world_size):
    cases = [(op, kind, packed) for op in OPS for kind in ("none", "head", "key") for packed in (False, True)]
    for results in run_distributed(_all_cases, world_size, cases):
        for (op, kind, packed), (check, fwd, bwd, reached) in zip(cases, results):
            if world_size == 1:  # at P > 1 the argument check also runs the cross-rank agreement check
                assert len(check) == (kind != "none") + packed, (op, kind, packed, check)
            assert fwd == check, (op, kind, packed, fwd)  # the forward's only syncs are its argument check's
            assert bwd == [], (op, kind, packed, bwd)
            assert reached


# ------------------------------------------------------------------------------------------------------
# The graph-keeping paths: only the initial state needs a gradient; no gradient at all
# ------------------------------------------------------------------------------------------------------


def initial_state_alone_and_inference() -> list[float]:
    """Errors against the float64 recurrence: per op the summed initial-state gradient (nothing else requires
    grad, so the op keeps no local graphs) and the output; then ZeCO's output under no_grad."""
    from seqpar.kernels.reference import reference_gated_delta_rule

    p, rank = dist.get_world_size(), dist.get_rank()
    x = make_problem(3, SHARD * p, p, "key", True, 3)
    init = x["initial_state"].clone().requires_grad_(True)
    o, _ = reference_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], initial_state=init)
    (o * x["w"]).sum().backward()
    sl = slice(rank * SHARD, (rank + 1) * SHARD)
    local = [x[n][:, sl] for n in PER_TOKEN]
    errors = []
    for op in OPS.values():
        mine = x["initial_state"].clone().requires_grad_(True)
        o_sp = op(*local[:4], log_decay=local[4], initial_state=mine, chunk_size=4)
        (o_sp * x["w"][:, sl]).sum().backward()
        total = mine.grad.clone()
        dist.all_reduce(total)
        errors += [(total - init.grad).abs().max().item(), (o_sp - o[:, sl]).abs().max().item()]
    with torch.no_grad():
        o_sp = zeco_delta_rule(*local[:4], log_decay=local[4], initial_state=x["initial_state"], chunk_size=4)
    errors.append((o_sp - o[:, sl]).abs().max().item())
    return errors


def test_initial_state_gradient_alone_and_inference_equal_the_recurrence():
    for errors in run_distributed(initial_state_alone_and_inference, 3):
        assert max(errors) < 1e-10, errors
