"""LASP-2 linear-attention SP: equal to the float64 recurrence on the whole sequence (forward, final state and
every gradient), exact bytes independent of S, the all-gather issued before the intra-chunk compute, bad input
raising on every rank before any transfer.

The rank functions here are shared with test_zeco.py (same contract, op chosen by name).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.checks import rel_err
from tests.harness import run_distributed
from seqpar.collectives import comm
from seqpar.collectives.lasp2 import lasp2_linear_attention
from seqpar.collectives.zeco import zeco_linear_attention
from seqpar.kernels.reference import reference_linear_attention
from seqpar.tracing import trace_events

WORLD_SIZES = [1, 2, 3, 4, 8]
B, H, DK = 2, 2, 8
OPS = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}
OUT_TOL, GRAD_TOL = 1e-5, 1e-4

# (decay kind, initial state, output_final_state, Dv, extra options): every decay kind with and without
# initial and final state; Dk != Dv both ways.
CASES = [
    (kind, init, final, dv)
    for kind in ("none", "head", "token")
    for (init, final, dv) in ((False, False, 12), (True, True, 4), (True, False, 12), (False, True, 4))
]


def make_inputs(seed: int, p: int, s_local: int, kind: str, with_init: bool, dv: int) -> dict:
    """The global float64 problem, the same on every rank (seeded), plus per-rank final-state loss weights."""
    gen = torch.Generator().manual_seed(seed)
    s = p * s_local
    x = {
        "q": torch.randn(B, s, H, DK, generator=gen, dtype=torch.float64),
        "k": torch.randn(B, s, H, DK, generator=gen, dtype=torch.float64),
        "v": torch.randn(B, s, H, dv, generator=gen, dtype=torch.float64),
        "w": torch.randn(B, s, H, dv, generator=gen, dtype=torch.float64),  # output loss weights
        "u": torch.randn(p, B, H, DK, dv, generator=gen, dtype=torch.float64),  # final-state loss weights per rank
        "log_decay": None,
        "initial_state": None,
    }
    if kind == "head":
        x["log_decay"] = -(0.05 + 0.5 * torch.rand(H, generator=gen, dtype=torch.float64))
    elif kind == "token":
        x["log_decay"] = -0.6 * torch.rand(B, s, H, generator=gen, dtype=torch.float64)
    if with_init:
        x["initial_state"] = torch.randn(B, H, DK, dv, generator=gen, dtype=torch.float64)
    return x


def reference(x: dict, with_final: bool) -> dict:
    """Float64 recurrence on the whole sequence; loss = <o, w> + <final, sum over ranks of u> (summed convention)."""
    names = [n for n in ("q", "k", "v", "log_decay", "initial_state") if x[n] is not None]
    leaf = {n: x[n].clone().requires_grad_(True) for n in names}
    o, final = reference_linear_attention(
        leaf["q"], leaf["k"], leaf["v"], log_decay=leaf.get("log_decay"), initial_state=leaf.get("initial_state")
    )
    loss = (o * x["w"]).sum() + ((final * x["u"].sum(0)).sum() if with_final else 0)
    grads = dict(zip(names, torch.autograd.grad(loss, [leaf[n] for n in names])))
    return {"o": o.detach(), "final": final.detach(), "grads": grads}


def run_case(op_name: str, x: dict, ref: dict, with_final: bool, **options) -> dict:
    """This rank's float32 SP run; errors of local results against the reference slices, and the partial
    gradients of whole-held inputs (the test sums them over ranks)."""
    rank, p = dist.get_rank(), dist.get_world_size()
    s_local = x["q"].shape[1] // p
    sl = slice(rank * s_local, (rank + 1) * s_local)
    local = {n: x[n][:, sl].float().clone().requires_grad_(True) for n in ("q", "k", "v")}
    g = x["log_decay"]
    if g is not None:
        local["log_decay"] = (g if g.dim() == 1 else g[:, sl]).float().clone().requires_grad_(True)
    if x["initial_state"] is not None:
        local["initial_state"] = x["initial_state"].float().clone().requires_grad_(True)
    out = OPS[op_name](
        local["q"], local["k"], local["v"], log_decay=local.get("log_decay"),
        initial_state=local.get("initial_state"), output_final_state=with_final, **options,
    )
    o, final = out if with_final else (out, None)
    loss = (o * x["w"][:, sl].float()).sum()
    if with_final:
        loss = loss + (final * x["u"][rank].float()).sum()
    loss.backward()
    errors = {"o": rel_err(o, ref["o"][:, sl])}
    if with_final:
        errors["final"] = rel_err(final, ref["final"])
    for n in ("q", "k", "v"):
        errors[f"d{n}"] = rel_err(local[n].grad, ref["grads"][n][:, sl])
    partial = {}
    if g is not None and g.dim() == 3:
        errors["dlog_decay"] = rel_err(local["log_decay"].grad, ref["grads"]["log_decay"][:, sl])
    elif g is not None:
        partial["log_decay"] = local["log_decay"].grad.double()
    if x["initial_state"] is not None:
        partial["initial_state"] = local["initial_state"].grad.double()
    return {"errors": errors, "partial": partial, "dtype_ok": o.dtype == torch.float32}


def check_against_reference(op_names: list[str], s_local: int, options: dict[str, dict]) -> list:
    """Every case of CASES for every op; per case the errors, partials and (rank 0) the whole-held references."""
    p = dist.get_world_size()
    results = []
    for i, (kind, init, final, dv) in enumerate(CASES):
        x = make_inputs(100 + i, p, s_local, kind, init, dv)
        ref = reference(x, final)
        whole_ref = {n: ref["grads"][n] for n in ("log_decay", "initial_state")
                     if x[n] is not None and x[n].dim() in (1, 4)}
        for op_name in op_names:
            res = run_case(op_name, x, ref, final, **options.get(op_name, {}))
            results.append(((op_name, kind, init, final, dv), res, whole_ref if dist.get_rank() == 0 else None))
    return results


def assert_matches_reference(per_rank: list) -> None:
    for case_index in range(len(per_rank[0])):
        case = per_rank[0][case_index][0]
        for rank, results in enumerate(per_rank):
            _, res, _ = results[case_index]
            assert res["dtype_ok"], case
            for name, err in res["errors"].items():
                tol = OUT_TOL if name in ("o", "final") else GRAD_TOL
                assert err < tol, (case, rank, name, err)
        whole_ref = per_rank[0][case_index][2]
        for name, ref in whole_ref.items():
            total = sum(results[case_index][1]["partial"][name] for results in per_rank)
            assert rel_err(total, ref) < GRAD_TOL, (case, "sum of partials", name, rel_err(total, ref))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_lasp2_equals_the_float64_recurrence(world_size):
    per_rank = run_distributed(check_against_reference, world_size, ["lasp2"], 5, {})
    assert_matches_reference(per_rank)


# ------------------------------------------------------------------------------------------------------
# Bytes
# ------------------------------------------------------------------------------------------------------


def measure_bytes(op_name: str, s_local: int, kind: str, final: bool, options: dict) -> tuple:
    """(forward bytes, backward bytes, forward calls, backward calls) this rank sent for one fwd+bwd."""
    p = dist.get_world_size()
    x = make_inputs(7, p, s_local, kind, True, 4)
    rank = dist.get_rank()
    sl = slice(rank * s_local, (rank + 1) * s_local)
    q, k, v = (x[n][:, sl].float().requires_grad_(True) for n in ("q", "k", "v"))
    g = x["log_decay"]
    g = None if g is None else (g if g.dim() == 1 else g[:, sl]).float().requires_grad_(True)
    init = x["initial_state"].float().requires_grad_(True)
    with comm.count_comm() as fwd:
        out = OPS[op_name](q, k, v, log_decay=g, initial_state=init, output_final_state=final, **options)
    o, f = out if final else (out, None)
    loss = o.sum() + (f.sum() if final else 0)
    with comm.count_comm() as bwd:
        loss.backward()
    return fwd.bytes_sent, bwd.bytes_sent, dict(fwd.calls), dict(bwd.calls)


def lasp2_bytes(p: int, kind: str, final: bool, dv: int, e: int = 4) -> tuple[int, int]:
    n = B * H * DK * dv
    # every rank's total decay travels with its state for every decay kind (ranks may hold different lengths,
    # so a per-head decay's total S_r * g differs between them)
    fwd = (p - 1) * (n + (B * H if kind != "none" else 0)) * e
    bwd = (p - 1) * (2 if final else 1) * n * e
    return fwd, bwd


def bytes_for_lengths(op_name: str, options: dict) -> dict:
    return {
        (kind, final, s_local): measure_bytes(op_name, s_local, kind, final, options)
        for kind in ("none", "head", "token") for final in (False, True) for s_local in (8, 16)
    }


@pytest.mark.parametrize("world_size", [1, 4])
def test_lasp2_bytes_equal_the_formula_and_do_not_grow_with_length(world_size):
    for rank, got in enumerate(run_distributed(bytes_for_lengths, world_size, "lasp2", {})):
        for (kind, final, s_local), (fwd, bwd, fwd_calls, bwd_calls) in got.items():
            assert (fwd, bwd) == lasp2_bytes(world_size, kind, final, 4), (rank, kind, final, s_local)
            assert (fwd, bwd) == got[(kind, final, 8)][:2]  # S doubled: same bytes
            expected_calls = {"all_gather": 1} if world_size > 1 else {}
            assert fwd_calls == expected_calls and bwd_calls == expected_calls


# ------------------------------------------------------------------------------------------------------
# Schedule: the all-gather flies while the intra-chunk part is computed
# ------------------------------------------------------------------------------------------------------


def lasp2_event_order():
    p, rank = dist.get_world_size(), dist.get_rank()
    x = make_inputs(3, p, 8, "token", False, 4)
    sl = slice(rank * 8, (rank + 1) * 8)
    q, k, v = (x[n][:, sl].float().requires_grad_(True) for n in ("q", "k", "v"))
    g = x["log_decay"][:, sl].float().requires_grad_(True)
    with trace_events() as fwd:
        o = lasp2_linear_attention(q, k, v, log_decay=g)
    with trace_events() as bwd:
        o.sum().backward()

    def order(events):
        return [e["kind"] + ":" + str(e.get("op") or e.get("name") or e.get("what", "")) for e in events]

    return order(fwd), order(bwd)


def test_lasp2_issues_the_all_gather_before_the_intra_chunk_compute():
    for fwd, bwd in run_distributed(lasp2_event_order, 3):
        gather, intra = fwd.index("comm:all_gather"), fwd.index("kernel:lasp2.intra")
        wait = next(i for i, e in enumerate(fwd) if e.startswith("wait:all_gather"))
        assert fwd.index("kernel:lasp2.local_state") < gather < intra < wait < fwd.index("kernel:lasp2.inter")
        assert fwd.count("comm:all_gather") == 1
        gather, intra = bwd.index("comm:all_gather"), bwd.index("kernel:lasp2.intra_backward")
        wait = next(i for i, e in enumerate(bwd) if e.startswith("wait:all_gather"))
        assert gather < intra < wait and bwd.count("comm:all_gather") == 1


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


def bad_inputs(op_name: str) -> dict:
    """Each bad call on every rank: the ValueError message, and what was sent / traced before it (nothing)."""
    op = OPS[op_name]
    q = torch.randn(1, 4, H, DK)
    v = torch.randn(1, 4, H, 6)
    calls = {
        "positive log_decay": lambda: op(q, q, v, log_decay=torch.full((H,), 0.1)),
        "positive per-token log_decay": lambda: op(q, q, v, log_decay=torch.rand(1, 4, H)),
        "nan log_decay": lambda: op(q, q, v, log_decay=torch.full((H,), float("nan"))),
        "log_decay shape": lambda: op(q, q, v, log_decay=-torch.rand(1, 3, H)),
        "k shape": lambda: op(q, q[:, :3], v),
        "v shape": lambda: op(q, q, v[:, :, :1]),
        "q rank": lambda: op(q[0], q[0], v[0]),
        "dtype mix": lambda: op(q, q.double(), v),
        "state shape": lambda: op(q, q, v, initial_state=torch.zeros(1, H, DK, 5)),
        "layout": lambda: op(q, q, v, layout="zigzag"),
        "empty": lambda: op(q[:, :0], q[:, :0], v[:, :0]),
    }
    if op_name == "zeco":
        calls["num_pieces"] = lambda: op(q, q, v, num_pieces=DK + 1)
    out = {}
    for name, call in calls.items():
        with comm.count_comm() as stats, trace_events() as events:
            try:
                call()
                message = None
            except ValueError as err:
                message = str(err)
        out[name] = (message, stats.bytes_sent, [e for e in events if e["kind"] in ("comm", "wait")])
    return out


EXPECTED_ARGUMENT = {
    "positive log_decay": "log_decay", "positive per-token log_decay": "log_decay", "nan log_decay": "log_decay",
    "log_decay shape": "log_decay", "k shape": "k", "v shape": "v", "q rank": "q", "dtype mix": "k, v",
    "state shape": "initial_state", "layout": "layout", "empty": "q", "num_pieces": "num_pieces",
}


def assert_bad_inputs_raise_everywhere(per_rank: list[dict]) -> None:
    for rank, out in enumerate(per_rank):
        for name, (message, sent, events) in out.items():
            assert message is not None, (rank, name, "did not raise")
            assert message.startswith(EXPECTED_ARGUMENT[name] + ":"), (name, message)
            assert sent == 0 and events == [], (rank, name)


def test_lasp2_bad_input_raises_on_every_rank_before_any_transfer():
    assert_bad_inputs_raise_everywhere(run_distributed(bad_inputs, 2, "lasp2"))
