"""Rank functions shared by test_linear_uneven.py and test_linear_varlen.py: a global float64 problem (seeded,
the same on every rank), this rank's shard of it, one SP call, and the errors against the float64 recurrence
(``reference_linear_attention``) run on the whole sequences.

Whole-held inputs (per-head log_decay, initial_state) come back as partial gradients; the test sums them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.checks import rel_err
from seqpar.collectives.lasp2 import lasp2_linear_attention
from seqpar.collectives.zeco import zeco_linear_attention
from seqpar.kernels.reference import reference_linear_attention

OPS = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}
KINDS = ("none", "head", "token", "key")
H, DK, DV = 2, 4, 3
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}  # (outputs and states, gradients)


def global_problem(seed: int, lengths: list[int], batch: int, kind: str, with_init: bool) -> list[dict]:
    """One dict per sequence (batch rows stay in the batch dim): q, k, v, w (output loss weights), log_decay,
    initial_state (None or (batch, H, DK, DV)) and u (final-state loss weights, one per rank of the sum)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        x = {name: torch.randn(batch, n, H, d, generator=gen, dtype=torch.float64)
             for name, d in (("q", DK), ("k", DK), ("v", DV), ("w", DV))}
        x["log_decay"] = {
            "none": None,
            "head": -(0.05 + 0.5 * torch.rand(H, generator=gen, dtype=torch.float64)),
            "token": -0.6 * torch.rand(batch, n, H, generator=gen, dtype=torch.float64),
            "key": -0.6 * torch.rand(batch, n, H, DK, generator=gen, dtype=torch.float64),
        }[kind]
        x["initial_state"] = torch.randn(batch, H, DK, DV, generator=gen, dtype=torch.float64) if with_init else None
        x["u"] = torch.randn(batch, H, DK, DV, generator=gen, dtype=torch.float64)
        out.append(x)
    if kind == "head":  # one per-head decay for the whole batch
        for x in out[1:]:
            x["log_decay"] = out[0]["log_decay"]
    return out


def reference(seqs: list[dict], with_final: bool) -> dict:
    """Per sequence o, final, and the gradients of sum_i <o_i, w_i> + [with_final] <final_i, u_i>."""
    names = ("q", "k", "v", "log_decay", "initial_state")
    leaves = [{n: (x[n].clone().requires_grad_(True) if x[n] is not None else None) for n in names} for x in seqs]
    if seqs[0]["log_decay"] is not None and seqs[0]["log_decay"].dim() == 1:  # shared per-head decay: one leaf
        for leaf in leaves[1:]:
            leaf["log_decay"] = leaves[0]["log_decay"]
    loss, outs, finals = 0, [], []
    for x, leaf in zip(seqs, leaves):
        o, f = reference_linear_attention(leaf["q"], leaf["k"], leaf["v"], log_decay=leaf["log_decay"],
                                          initial_state=leaf["initial_state"])
        loss = loss + (o * x["w"]).sum() + ((f * x["u"]).sum() if with_final else 0)
        outs.append(o.detach())
        finals.append(f.detach())
    flat = [(i, n, leaf[n]) for i, leaf in enumerate(leaves) for n in names if leaf[n] is not None]
    if seqs[0]["log_decay"] is not None and seqs[0]["log_decay"].dim() == 1:
        flat = [t for t in flat if not (t[1] == "log_decay" and t[0] > 0)]
    grads = torch.autograd.grad(loss, [t[2] for t in flat])
    per_seq = [{} for _ in seqs]
    for (i, n, _), g in zip(flat, grads):
        per_seq[i][n] = g
    return {"o": outs, "final": finals, "grads": per_seq}


def run_sp(op_name: str, seqs: list[dict], ref: dict, cuts: list[list[int]], *, packed: bool, with_final: bool,
           dtype: torch.dtype, **options) -> dict:
    """This rank's SP call. ``cuts[i]`` are sequence i's P + 1 cut points: rank r holds tokens
    cuts[i][r]:cuts[i][r + 1]. Unpacked: one sequence (any batch). Packed: batch 1, the rank's pieces of every
    sequence concatenated with local ``cu_seqlens``."""
    rank, p = dist.get_rank(), dist.get_world_size()
    kind_head = seqs[0]["log_decay"] is not None and seqs[0]["log_decay"].dim() == 1

    def local_of(name):
        pieces = [x[name][:, c[rank]:c[rank + 1]] for x, c in zip(seqs, cuts)]
        return torch.cat(pieces, 1)

    def leaf(t):
        return t.detach().to(dtype).clone().requires_grad_(True)

    local = {n: leaf(local_of(n)) for n in ("q", "k", "v")}
    g = seqs[0]["log_decay"]
    if g is not None:
        g = leaf(g if kind_head else local_of("log_decay"))
    init = None
    if seqs[0]["initial_state"] is not None:
        init = leaf(torch.cat([x["initial_state"] for x in seqs], 0))
    if packed:
        lens = [c[rank + 1] - c[rank] for c in cuts]
        options["cu_seqlens"] = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    out = OPS[op_name](local["q"], local["k"], local["v"], log_decay=g, initial_state=init,
                       output_final_state=with_final, **options)
    o, final = out if with_final else (out, None)
    u = torch.cat([x["u"] for x in seqs], 0).to(dtype) / p  # every rank adds 1/P of the final-state term
    loss = (o * local_of("w").to(dtype)).sum() + ((final * u).sum() if with_final else 0)
    loss.backward()

    def ref_local(values):
        return torch.cat([val[:, c[rank]:c[rank + 1]] for val, c in zip(values, cuts)], 1)

    errors = {"o": rel_err(o, ref_local(ref["o"]))}
    if with_final:
        errors["final"] = rel_err(final, torch.cat(ref["final"], 0))
    for n in ("q", "k", "v"):
        errors[f"d{n}"] = rel_err(local[n].grad, ref_local([gr[n] for gr in ref["grads"]]))
    partial = {}
    if g is not None and not kind_head:
        errors["dlog_decay"] = rel_err(g.grad, ref_local([gr["log_decay"] for gr in ref["grads"]]))
    elif g is not None:
        partial["log_decay"] = g.grad.double()
    if init is not None:
        partial["initial_state"] = init.grad.double()
    return {"errors": errors, "partial": partial, "dtype_ok": o.dtype == dtype}


def whole_held_reference(seqs: list[dict], ref: dict) -> dict:
    out = {}
    if seqs[0]["log_decay"] is not None and seqs[0]["log_decay"].dim() == 1:
        out["log_decay"] = ref["grads"][0]["log_decay"]
    if seqs[0]["initial_state"] is not None:
        out["initial_state"] = torch.cat([gr["initial_state"] for gr in ref["grads"]], 0)
    return out


def assert_all_match(per_rank: list) -> None:
    """per_rank[r] = list of (case, dtype, result, whole-held reference) in the same order on every rank."""
    for index in range(len(per_rank[0])):
        case, dtype, _, whole = per_rank[0][index]
        out_tol, grad_tol = TOL[dtype]
        for rank, results in enumerate(per_rank):
            res = results[index][2]
            assert res["dtype_ok"], case
            for name, err in res["errors"].items():
                tol = out_tol if name in ("o", "final") else grad_tol
                assert err < tol, (case, rank, name, err)
        for name, ref in whole.items():
            total = sum(results[index][2]["partial"][name] for results in per_rank)
            assert rel_err(total, ref) < grad_tol, (case, "sum of partials", name, rel_err(total, ref))
