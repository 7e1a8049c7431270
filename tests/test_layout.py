"""Layouts: exact round trips on real ranks, the index pattern by hand, and clear errors."""

import pytest
import torch
import torch.distributed as dist

from tests.checks import value_errors
from tests.harness import run_distributed
from seqpar.collectives.layout import (
    local_positions,
    pad_for_layout,
    shard_indices,
    shard_sequence,
    unshard_sequence,
)

WORLD_SIZES = [1, 2, 3, 4, 8]


def test_zigzag_indices_by_hand():
    # 16 tokens, 4 ranks -> 8 chunks of 2; rank 1 holds chunks 1 and 6.
    assert shard_indices(16, 4, 1, layout="zigzag").tolist() == [2, 3, 12, 13]
    assert shard_indices(12, 3, 2, layout="contiguous").tolist() == [8, 9, 10, 11]
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    # sequence 0 (4 tokens, chunks of 1): rank 0 -> 0, 3; sequence 1 (8 tokens, chunks of 2): rank 0 -> 4,5,10,11
    assert shard_indices(12, 2, 0, layout="zigzag", cu_seqlens=cu).tolist() == [0, 3, 4, 5, 10, 11]


def round_trip(layout, seed):
    size = dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2 * size * 3, 5, generator=gen)
    local = shard_sequence(x, layout=layout)
    back = unshard_sequence(local, layout=layout)
    # packed: 3 sequences, lengths multiples of 2P
    lens = [2 * size * m for m in (1, 3, 2)]
    cu = torch.tensor([0, lens[0], lens[0] + lens[1], sum(lens)], dtype=torch.int32)
    packed = torch.randn(sum(lens), 3, generator=gen)
    p_local, p_cu = shard_sequence(packed, layout=layout, cu_seqlens=cu)
    p_back = unshard_sequence(p_local, layout=layout, cu_seqlens=cu)
    positions = local_positions(x.shape[1], layout=layout)
    return (
        torch.equal(back, x),
        torch.equal(local, x[:, positions]),
        torch.equal(p_back, packed),
        p_cu.tolist() == [c // size for c in cu.tolist()],
        positions.tolist(),
    )


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_shard_unshard_round_trip_is_exact(world_size, layout):
    results = run_distributed(round_trip, world_size, layout, seed=world_size)
    for exact, matches_positions, packed_exact, cu_ok, _ in results:
        assert exact and matches_positions and packed_exact and cu_ok
    # every token is held by exactly one rank
    held = sorted(i for *_, positions in results for i in positions)
    assert held == list(range(2 * world_size * 3))


def unshard_gradient():
    # loss = sum(w * unshard(x_local)); every rank holds the same loss, so d/dx_local = P * w[my tokens]
    size = dist.get_world_size()
    w = torch.arange(2 * size * 2, dtype=torch.float64)[None, :, None]
    x_local = torch.zeros(1, 4, 1, dtype=torch.float64, requires_grad=True)
    (unshard_sequence(x_local) * w).sum().backward()
    return torch.equal(x_local.grad, size * shard_sequence(w))


@pytest.mark.parametrize("world_size", [2, 3])
def test_unshard_backward_sums_every_ranks_gradient(world_size):
    assert all(run_distributed(unshard_gradient, world_size))


def test_pad_for_layout_pads_each_sequence_and_reports_it():
    x = torch.arange(10.0)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    padded = pad_for_layout(x, world_size=2, layout="zigzag", cu_seqlens=cu, value=-1)
    assert padded.cu_seqlens.tolist() == [0, 4, 12]
    assert padded.pad_lengths == [1, 1]
    assert padded.tensor.tolist() == [0, 1, 2, -1, 3, 4, 5, 6, 7, 8, 9, -1]
    assert torch.equal(padded.tensor[padded.real_mask], x)
    dense = pad_for_layout(torch.ones(2, 5, 3), world_size=3, layout="contiguous")
    assert dense.tensor.shape == (2, 6, 3) and dense.pad_lengths == [1]


def bad_layout_calls():
    x = torch.randn(2, 2 * dist.get_world_size() + 1, 4)
    good = torch.randn(16, 2)
    calls = {
        "seq_len": lambda: shard_sequence(x),
        "layout": lambda: shard_sequence(good, layout="ring"),
        "dim": lambda: shard_sequence(good, dim=5),
        "cu_seqlens-dtype": lambda: shard_sequence(good, cu_seqlens=torch.tensor([0, 16])),
        "cu_seqlens-order": lambda: shard_sequence(good, cu_seqlens=torch.tensor([0, 8, 8, 16], dtype=torch.int32)),
        "cu_seqlens-total": lambda: shard_sequence(good, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)),
    }
    return value_errors(calls)


def test_bad_input_raises_value_error_naming_the_argument_on_every_rank():
    for messages in run_distributed(bad_layout_calls, 4, timeout=30):
        for name, message in messages.items():
            assert message is not None, name
            assert message.startswith(name.split("-")[0] + ":"), message
