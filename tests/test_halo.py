"""The halo exchange (seqpar.collectives.halo): a causal conv1d over shards equals the one-process conv on the
whole sequence, outputs and every gradient (x, weight, bias), at P = 1..8, kernel widths 2..4, equal and unequal
shards (and equal shards shorter than the halo: the chained relay); bytes equal the formula; ranks that
disagree on whether their shard is shorter than the halo raise on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.collectives import comm
from seqpar.collectives.halo import causal_conv1d, halo_exchange
from tests.checks import rel_err
from tests.harness import run_distributed

B, C = 2, 3


def lengths_for(p: int, width: int, shards: str) -> list[int]:
    """Equal shards, unequal ones (each >= the halo), or equal ones shorter than the halo (the chained relay)."""
    return {"equal": [4] * p, "unequal": [width - 1 + (3 * r) % 4 for r in range(p)], "short": [1] * p}[shards]


def conv_case(width: int, shards: str, dtype_name: str) -> dict:
    """This rank's errors against F.conv1d on the whole float64 sequence, and its partial weight/bias grads."""
    p, rank = dist.get_world_size(), dist.get_rank()
    dtype = getattr(torch, dtype_name)
    lengths = lengths_for(p, width, shards)
    gen = torch.Generator().manual_seed(width * 10 + len(shards))
    s = sum(lengths)
    x = torch.randn(B, s, C, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(C, generator=gen, dtype=torch.float64)
    dy = torch.randn(B, s, C, generator=gen, dtype=torch.float64)
    # the reference: transformers' causal_conv1d_fn without activation, whole sequence, float64
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    ref = F.conv1d(ref_leaves[0].mT, ref_leaves[1][:, None], ref_leaves[2], padding=width - 1, groups=C)[..., :s].mT
    ref_grads = torch.autograd.grad((ref * dy).sum(), ref_leaves)
    start = sum(lengths[:rank])
    sl = slice(start, start + lengths[rank])
    xl = x[:, sl].to(dtype).requires_grad_(True)
    wl, bl = weight.to(dtype).requires_grad_(True), bias.to(dtype).requires_grad_(True)
    with comm.count_comm() as fwd:
        out = causal_conv1d(xl, wl, bl)
    with comm.count_comm() as bwd:
        (out * dy[:, sl].to(dtype)).sum().backward()
    return {"out": rel_err(out, ref[:, sl]), "dx": rel_err(xl.grad, ref_grads[0][:, sl]),
            "dweight": wl.grad.double(), "dbias": bl.grad.double(), "ref_dweight": ref_grads[1],
            "ref_dbias": ref_grads[2], "bytes": (fwd.bytes_sent, bwd.bytes_sent)}


def all_conv_cases(dtype_name: str) -> list:
    cases = [(w, shards) for w in (2, 3, 4) for shards in ("equal", "unequal")] + [(3, "short")]
    return [(case, conv_case(*case, dtype_name)) for case in cases]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_sharded_causal_conv_equals_one_process(world_size):
    per_rank = run_distributed(all_conv_cases, world_size, "float32")
    for i, ((width, shards), _) in enumerate(per_rank[0]):
        for rank, cases in enumerate(per_rank):
            res = cases[i][1]
            assert res["out"] < 1e-6 and res["dx"] < 1e-6, (width, shards, rank, res["out"], res["dx"])
            halo = B * (width - 1) * C * 4
            assert res["bytes"] == (halo if rank < world_size - 1 else 0, halo if rank > 0 else 0), (width, rank)
        for name in ("dweight", "dbias"):  # partial on each rank; their sum is the whole gradient
            total = sum(cases[i][1][name] for cases in per_rank)
            assert rel_err(total, per_rank[0][i][1]["ref_" + name]) < 1e-5, (width, shards, name)


def test_sharded_causal_conv_float64_is_exact():
    per_rank = run_distributed(all_conv_cases, 3, "float64")
    for cases in per_rank:
        for (width, shards), res in cases:
            assert res["out"] < 1e-13 and res["dx"] < 1e-13, (width, shards)


def packed_conv(width: int, per_rank: list[int]) -> dict:
    """Packed sequences (each cut in P equal parts): errors against each sequence's own conv, bytes, weight
    gradient partials."""
    p, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(width)
    weight = torch.randn(C, width, generator=gen, dtype=torch.float64)
    seqs = [(torch.randn(1, p * n, C, generator=gen, dtype=torch.float64),
             torch.randn(1, p * n, C, generator=gen, dtype=torch.float64)) for n in per_rank]
    ref_w = weight.clone().requires_grad_(True)
    refs, loss = [], 0.0
    for x, dy in seqs:
        xl = x.clone().requires_grad_(True)
        out = F.conv1d(xl.mT, ref_w[:, None], None, padding=width - 1, groups=C)[..., :x.shape[1]].mT
        loss = loss + (out * dy).sum()
        refs.append((out, xl))
    loss.backward()
    local = torch.cat([x[:, rank * n:(rank + 1) * n] for (x, _), n in zip(seqs, per_rank)], 1).float()
    local.requires_grad_(True)
    wl = weight.float().requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor(per_rank).cumsum(0).tolist()], dtype=torch.int32)
    with comm.count_comm() as stats:
        out = causal_conv1d(local, wl, cu_seqlens=cu)
    dy = torch.cat([d[:, rank * n:(rank + 1) * n] for (_, d), n in zip(seqs, per_rank)], 1).float()
    (out * dy).sum().backward()
    errors = []
    for j, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        sl = slice(rank * per_rank[j], (rank + 1) * per_rank[j])
        errors += [rel_err(out[:, a:b], refs[j][0][:, sl]), rel_err(local.grad[:, a:b], refs[j][1].grad[:, sl])]
    return {"errors": errors, "sends": stats.calls.get("send", 0), "dweight": wl.grad.double(),
            "ref_dweight": ref_w.grad}


@pytest.mark.parametrize("per_rank", [[3, 5, 4], [1, 4, 2]])  # every piece >= the halo: one exchange; or not
def test_packed_sequences_each_start_from_zeros(per_rank):
    width = 3
    results = run_distributed(packed_conv, 3, width, per_rank)
    for rank, res in enumerate(results):
        assert max(res["errors"]) < 1e-6, (rank, res["errors"])
        batched = min(per_rank) >= width - 1
        forward_sends = 0 if rank == 2 else (1 if batched else len(per_rank))
        assert res["sends"] == forward_sends, (rank, res["sends"])  # counted in the forward only
    total = sum(res["dweight"] for res in results)
    assert rel_err(total, results[0]["ref_dweight"]) < 1e-5


def mixed_short_shards() -> str | None:
    x = torch.zeros(1, 2 + 2 * dist.get_rank(), 3)  # rank 0 shorter than the halo, rank 1 not
    with comm.count_comm() as stats:
        try:
            halo_exchange(x, 3)
        except ValueError as err:
            return str(err), stats.bytes_sent
    return None, stats.bytes_sent


def test_ranks_disagreeing_on_short_shards_raise_on_every_rank():
    for message, sent in run_distributed(mixed_short_shards, 2):
        assert message is not None and "shorter than width" in message and sent == 0, message
