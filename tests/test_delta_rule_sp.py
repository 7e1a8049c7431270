"""Delta-rule SP (lasp2_delta_rule, zeco_delta_rule) against the float64 recurrence on the whole sequence:
outputs, final state and every gradient at P = 1..8, equal and unequal shards, with and without initial / final
state, per-head (Gated DeltaNet), per-key (KDA) and no decay; float32 1e-5 / 1e-4 and float64 1e-10; bytes equal
the documented formulas; bad input raises on every rank before any transfer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.collectives import comm
from seqpar.collectives.delta_rule import lasp2_delta_rule, zeco_delta_rule
from seqpar.collectives.zeco import final_state_tree
from seqpar.kernels.reference import reference_gated_delta_rule
from tests.checks import rel_err
from tests.harness import run_distributed

B, H, DK = 1, 2, 4
OPS = {"lasp2": lasp2_delta_rule, "zeco": zeco_delta_rule}
# (decay kind, initial state, final state, Dv, equal shards)
CASES = [
    ("head", True, True, 3, True),
    ("key", False, False, 5, False),
    ("head", False, True, 4, False),
    ("key", True, False, 3, True),
    ("none", True, True, 4, False),
]


def shard_lengths(p: int, equal: bool) -> list[int]:
    return [5] * p if equal else [3 + (2 * r) % 5 for r in range(p)]


def make_problem(seed: int, s: int, p: int, kind: str, with_init: bool, dv: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": rand(B, s, H, DK), "k": torch.nn.functional.normalize(rand(B, s, H, DK), dim=-1),
         "v": rand(B, s, H, dv), "beta": torch.sigmoid(rand(B, s, H)), "log_decay": None, "initial_state": None,
         "w": rand(B, s, H, dv), "u": rand(p, B, H, DK, dv)}
    if kind == "head":
        x["log_decay"] = -torch.nn.functional.softplus(rand(B, s, H)) * 0.5
    elif kind == "key":
        x["log_decay"] = -torch.nn.functional.softplus(rand(B, s, H, DK)) * 0.5
    if with_init:
        x["initial_state"] = rand(B, H, DK, dv)
    return x


PER_TOKEN = ("q", "k", "v", "beta", "log_decay")


def reference(x: dict, with_final: bool) -> dict:
    names = [n for n in (*PER_TOKEN, "initial_state") if x[n] is not None]
    leaf = {n: x[n].clone().requires_grad_(True) for n in names}
    o, final = reference_gated_delta_rule(leaf["q"], leaf["k"], leaf["v"], leaf["beta"], leaf.get("log_decay"),
                                          initial_state=leaf.get("initial_state"))
    loss = (o * x["w"]).sum() + ((final * x["u"].sum(0)).sum() if with_final else 0)
    return {"o": o.detach(), "final": final.detach(),
            "grads": dict(zip(names, torch.autograd.grad(loss, [leaf[n] for n in names])))}


def run_case(op_name: str, x: dict, ref: dict, lengths: list[int], with_final: bool, dtype) -> dict:
    """This rank's SP run: errors of its local results against the reference slices, and its partial gradient
    of the initial state (the test sums them over the ranks)."""
    rank = dist.get_rank()
    start = sum(lengths[:rank])
    sl = slice(start, start + lengths[rank])
    local = {n: x[n][:, sl].to(dtype).clone().requires_grad_(True) for n in PER_TOKEN if x[n] is not None}
    init = None if x["initial_state"] is None else x["initial_state"].to(dtype).clone().requires_grad_(True)
    out = OPS[op_name](local["q"], local["k"], local["v"], local["beta"], log_decay=local.get("log_decay"),
                       initial_state=init, output_final_state=with_final, chunk_size=4)
    o, final = out if with_final else (out, None)
    loss = (o * x["w"][:, sl].to(dtype)).sum()
    if with_final:
        loss = loss + (final * x["u"][rank].to(dtype)).sum()
    loss.backward()
    errors = {"o": rel_err(o, ref["o"][:, sl])}
    if with_final:
        errors["final"] = rel_err(final, ref["final"])
    for n, t in local.items():
        errors[f"d{n}"] = rel_err(t.grad, ref["grads"][n][:, sl])
    return {"errors": errors, "dtype_ok": o.dtype == dtype,
            "d_init": None if init is None else init.grad.double()}


def check_cases(op_names: list[str], dtype_name: str, cases: list) -> list:
    p = dist.get_world_size()
    dtype = getattr(torch, dtype_name)
    results = []
    for i, (kind, init, final, dv, equal) in enumerate(cases):
        lengths = shard_lengths(p, equal)
        x = make_problem(10 + i, sum(lengths), p, kind, init, dv)
        ref = reference(x, final)
        for op_name in op_names:
            res = run_case(op_name, x, ref, lengths, final, dtype)
            res["d_init_ref"] = ref["grads"].get("initial_state")
            results.append(((op_name, kind, init, final, dv, equal), res))
    return results


def assert_all_match(per_rank: list, out_tol: float, grad_tol: float) -> None:
    for i in range(len(per_rank[0])):
        case = per_rank[0][i][0]
        for rank, results in enumerate(per_rank):
            res = results[i][1]
            assert res["dtype_ok"], case
            for name, err in res["errors"].items():
                assert err < (out_tol if name in ("o", "final") else grad_tol), (case, rank, name, err)
        ref = per_rank[0][i][1]["d_init_ref"]
        if ref is not None:  # whole-held: the sum of the ranks' partials is the gradient
            total = sum(results[i][1]["d_init"] for results in per_rank)
            assert rel_err(total, ref) < grad_tol, (case, "initial_state")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_delta_rule_sp_equals_the_float64_recurrence(world_size):
    per_rank = run_distributed(check_cases, world_size, ["lasp2", "zeco"], "float32", CASES)
    assert_all_match(per_rank, 1e-5, 1e-4)


def test_delta_rule_sp_float64_is_exact():
    per_rank = run_distributed(check_cases, 3, ["lasp2", "zeco"], "float64", CASES[:3])
    assert_all_match(per_rank, 1e-10, 1e-10)


def packed_case(op_name: str, kind: str) -> dict:
    """Three sequences packed (cu_seqlens), each cut in P equal parts; initial and final states per sequence."""
    p, rank = dist.get_world_size(), dist.get_rank()
    per_rank = [2, 5, 3]
    seqs = [make_problem(40 + j, p * n, p, kind, True, 3) for j, n in enumerate(per_rank)]
    refs = [reference(x, True) for x in seqs]
    local = {n: torch.cat([x[n][:, rank * n_r:(rank + 1) * n_r] for x, n_r in zip(seqs, per_rank)], 1).float()
             .requires_grad_(True) for n in PER_TOKEN if seqs[0][n] is not None}
    init = torch.cat([x["initial_state"] for x in seqs]).float().requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor(per_rank).cumsum(0).tolist()], dtype=torch.int32)
    with comm.count_comm() as stats:
        o, final = OPS[op_name](local["q"], local["k"], local["v"], local["beta"], log_decay=local.get("log_decay"),
                                initial_state=init, output_final_state=True, cu_seqlens=cu, chunk_size=4)
    weights = torch.cat([x["w"][:, rank * n_r:(rank + 1) * n_r] for x, n_r in zip(seqs, per_rank)], 1).float()
    ((o * weights).sum() + (final * torch.cat([x["u"][rank] for x in seqs]).float()).sum()).backward()
    errors = {}
    for j, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        sl = slice(rank * per_rank[j], (rank + 1) * per_rank[j])
        errors[f"o{j}"] = rel_err(o[:, a:b], refs[j]["o"][:, sl])
        errors[f"final{j}"] = rel_err(final[j:j + 1], refs[j]["final"])
        for n, t in local.items():
            errors[f"d{n}{j}"] = rel_err(t.grad[:, a:b], refs[j]["grads"][n][:, sl])
    return {"errors": errors, "d_init": init.grad.double(), "all_gathers": stats.calls.get("all_gather", 0),
            "d_init_ref": torch.cat([r["grads"]["initial_state"] for r in refs])}


def packed_cases() -> list:
    return [((op, kind), packed_case(op, kind)) for op in OPS for kind in ("head", "key")]


def test_packed_sequences_run_in_one_call():
    world_size = 3
    per_rank = run_distributed(packed_cases, world_size)
    for i, (case, first) in enumerate(per_rank[0]):
        for rank, results in enumerate(per_rank):
            res = results[i][1]
            for name, err in res["errors"].items():
                assert err < (1e-5 if name[0] in "of" else 1e-4), (case, rank, name, err)
            assert res["all_gathers"] == (1 if case[0] == "lasp2" else 0), case  # one collective for 3 sequences
        total = sum(results[i][1]["d_init"] for results in per_rank)
        assert rel_err(total, first["d_init_ref"]) < 1e-4, case


# ------------------------------------------------------------------------------------------------------
# Bytes
# ------------------------------------------------------------------------------------------------------

DV_BYTES = 3


def measure_bytes(op_name: str, final: bool, num_pieces: int | None) -> tuple:
    p, rank = dist.get_world_size(), dist.get_rank()
    x = make_problem(7, 4 * p, p, "head", True, DV_BYTES)
    sl = slice(4 * rank, 4 * rank + 4)
    local = [x[n][:, sl].float().requires_grad_(True) for n in PER_TOKEN]
    init = x["initial_state"].float().requires_grad_(True)
    options = {"num_pieces": num_pieces} if op_name == "zeco" else {}
    with comm.count_comm() as fwd:
        out = OPS[op_name](*local[:4], log_decay=local[4], initial_state=init, output_final_state=final, **options)
    o, f = out if final else (out, None)
    loss = o.sum() + (f.sum() if final else 0)
    with comm.count_comm() as bwd:
        loss.backward()
    return fwd.bytes_sent, bwd.bytes_sent


def expected_bytes(op_name: str, p: int, rank: int, final: bool) -> tuple[int, int]:
    n, n_a, e = B * H * DK * DV_BYTES, B * H * DK * DK, 4
    if op_name == "lasp2":
        return (p - 1) * (n_a + n) * e, (p - 1) * (2 if final else 1) * n * e
    children = len(final_state_tree(rank, p)[1])
    fwd = (n * e if rank < p - 1 else 0) + (children * n * e if final else 0)
    bwd = (n * e if rank > 0 else 0) + (n * e if final and rank < p - 1 else 0)
    return fwd, bwd


def all_bytes() -> dict:
    return {(op, final, pieces): measure_bytes(op, final, pieces)
            for op in ("lasp2", "zeco") for final in (False, True) for pieces in ((None, 3) if op == "zeco" else
                                                                                  (None,))}


@pytest.mark.parametrize("world_size", [1, 4])
def test_delta_rule_sp_bytes_equal_the_formula(world_size):
    for rank, got in enumerate(run_distributed(all_bytes, world_size)):
        for (op, final, pieces), sent in got.items():
            assert sent == expected_bytes(op, world_size, rank, final), (op, final, pieces, rank, sent)


def registry_bytes() -> dict:
    """Forward and backward bytes at Dk = Dv (what the registry's formulas assume), no final state."""
    global DV_BYTES
    saved, DV_BYTES = DV_BYTES, DK
    try:
        return {op: measure_bytes(op, False, None) for op in ("lasp2", "zeco")}
    finally:
        DV_BYTES = saved


def test_registry_delta_rule_bytes_equal_count_comm():
    from seqpar import strategies

    world_size = 4
    per_rank = run_distributed(registry_bytes, world_size)
    shape = strategies.LayerShape(seq_len=4 * world_size, degree=world_size, heads=H, kv_heads=H, head_dim=DK,
                                  elem_bytes=4, state_bytes=H * DK * DK * 4)
    for op in ("lasp2", "zeco"):
        entry = strategies.get(op, "linear")
        assert entry.delta_rule_op.endswith(f":{op}_delta_rule")
        forward, backward = entry.delta_rule_comm_bytes(shape)
        sent = [got[op] for got in per_rank]
        over_ranks = max if entry.comm_bytes_over_ranks == "max" else (lambda xs: xs[0])
        assert all(s == sent[0] for s in sent) or entry.comm_bytes_over_ranks == "max"
        assert (forward, backward) == (over_ranks([f for f, _ in sent]), over_ranks([b for _, b in sent])), op


def zeco_piece_counts_agree() -> list:
    p, rank = dist.get_world_size(), dist.get_rank()
    lengths = shard_lengths(p, False)
    x = make_problem(5, sum(lengths), p, "key", True, 4)
    ref = reference(x, True)
    start = sum(lengths[:rank])
    sl = slice(start, start + lengths[rank])
    errors = []
    for pieces in (1, 2, 4):
        local = {n: x[n][:, sl].float().requires_grad_(True) for n in PER_TOKEN}
        o, final = zeco_delta_rule(local["q"], local["k"], local["v"], local["beta"], log_decay=local["log_decay"],
                                   initial_state=x["initial_state"].float(), output_final_state=True,
                                   num_pieces=pieces, chunk_size=4)
        ((o * x["w"][:, sl].float()).sum() + (final * x["u"][rank].float()).sum()).backward()
        errors.append(max(rel_err(o, ref["o"][:, sl]), rel_err(final, ref["final"]),
                          *(rel_err(t.grad, ref["grads"][n][:, sl]) / 10 for n, t in local.items())))
    return errors


def test_zeco_delta_rule_any_piece_count():
    for errors in run_distributed(zeco_piece_counts_agree, 4):
        assert max(errors) < 1e-5, errors


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


def bad_inputs() -> dict:
    rank = dist.get_rank()
    x = make_problem(1, 4, 1, "head", False, 3)
    q, k, v, beta, g = (x[n].float() for n in PER_TOKEN)
    messages = {}
    calls = {
        "layout": lambda op: op(q, k, v, beta, log_decay=g, layout="zigzag"),
        "beta": lambda op: op(q, k, v, beta[..., :1], log_decay=g),
        "log_decay": lambda op: op(q, k, v, beta, log_decay=-g),
        "agreement": lambda op: op(q, k, v[..., : 2 + (rank == 0)], beta, log_decay=g),
    }
    for name, call in calls.items():
        for op_name, op in OPS.items():
            with comm.count_comm() as stats:
                try:
                    call(op)
                    messages[(name, op_name)] = (None, stats.bytes_sent)
                except ValueError as err:
                    messages[(name, op_name)] = (str(err), stats.bytes_sent)
    return messages


def test_bad_input_raises_on_every_rank_before_any_transfer():
    for messages in run_distributed(bad_inputs, 2):
        for (name, op_name), (message, sent) in messages.items():
            assert message is not None, (name, op_name)
            assert sent == 0, (name, op_name)
            assert (name in message) if name != "agreement" else ("different arguments" in message), message
