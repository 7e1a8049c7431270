"""Communication primitives: values moved correctly and bytes counted exactly by the documented convention."""

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed
from seqpar.collectives import comm
from seqpar.tracing import trace_events

WORLD_SIZES = [1, 2, 3, 4, 8]


def exercise_primitives():
    rank, p = dist.get_rank(), dist.get_world_size()
    x = torch.full((3, 5), float(rank))  # 60 bytes
    nb = 60
    out = {}
    with comm.count_comm() as c:
        from_prev = comm.ring_exchange(x, direction="next").wait()[0]
        from_next = comm.ring_exchange(x, direction="prev").wait()[1]
        a, b = comm.ring_exchange_bidirectional(x, x + 100).wait()
        gathered = comm.all_gather(x)
        pieces = comm.all_to_all([torch.full((2,), float(10 * rank + j)) for j in range(p)])
        reduced = comm.all_reduce(torch.ones(6))
        scattered = comm.reduce_scatter(torch.ones(2 * p, 3) * (rank + 1))
    out["values"] = (
        from_prev[0, 0].item() == (rank - 1) % p,
        from_next[0, 0].item() == (rank + 1) % p,
        a[0, 0].item() == (rank - 1) % p and b[0, 0].item() == (rank + 1) % p + 100,
        gathered[:, 0, 0].tolist() == list(map(float, range(p))),
        [t[0].item() for t in pieces] == [float(10 * j + rank) for j in range(p)],
        reduced.tolist() == [float(p)] * 6,
        scattered.shape == (2, 3) and scattered[0, 0].item() == p * (p + 1) / 2,
    )
    out["bytes"] = c.bytes_sent
    out["expected"] = (
        4 * nb * (p > 1)  # four ring sends of x (a ring of one sends nothing)
        + nb * (p - 1)  # all_gather
        + 8 * (p - 1)  # all_to_all: 2 floats to each other rank
        + 2 * 24 * (p - 1) // p  # all_reduce of 24 bytes
        + (2 * p * 3 * 4) * (p - 1) // p  # reduce_scatter of the full input
    )
    out["calls"] = c.calls
    out["direction"] = c.bytes_by_direction
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_primitives_move_the_right_values_and_count_bytes_exactly(world_size):
    for r, res in enumerate(run_distributed(exercise_primitives, world_size)):
        assert all(res["values"]), (r, res["values"])
        assert res["bytes"] == res["expected"]
        ring = {"send": 4} if world_size > 1 else {}
        assert res["calls"] == {**ring, "all_gather": 1, "all_to_all": 1, "all_reduce": 1, "reduce_scatter": 1}
        assert res["direction"] == ({"next": 120, "prev": 120} if world_size > 1 else {})


def explicit_peers_and_trace():
    rank, p = dist.get_rank(), dist.get_world_size()
    with trace_events() as events, comm.count_comm() as c:
        if rank == 0:
            pending = [comm.send(torch.tensor([float(j)]), j) for j in range(1, p)]
            for w in pending:
                w.wait()
            got = None
        else:
            got = comm.recv(torch.zeros(1), 0).wait().item()
    return got, c.bytes_by_peer, [e["kind"] for e in events]


def test_point_to_point_counts_bytes_per_peer():
    results = run_distributed(explicit_peers_and_trace, 3)
    assert results[0][1] == {1: 4, 2: 4}
    assert [r[0] for r in results[1:]] == [1.0, 2.0]
    assert results[0][2][:2] == ["comm", "comm"]


def differentiable_collectives():
    rank, p = dist.get_rank(), dist.get_world_size()
    x = torch.full((2,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = comm.all_gather_differentiable(x)  # (P, 2)
    weights = torch.arange(p, dtype=torch.float64)[:, None]
    (gathered * weights).sum().backward()
    grad_gather = x.grad.tolist()  # every rank weights rank r's copy by r: grad = P * rank
    y = torch.arange(2 * p, dtype=torch.float64).requires_grad_(True)
    parts = comm.all_to_all_differentiable(list(y.chunk(p)))
    sum(part.sum() * (j + 1) for j, part in enumerate(parts)).backward()
    return grad_gather, y.grad.tolist()


@pytest.mark.parametrize("world_size", [2, 3])
def test_differentiable_collectives_have_the_right_adjoints(world_size):
    for rank, (grad_gather, grad_a2a) in enumerate(run_distributed(differentiable_collectives, world_size)):
        assert grad_gather == [float(world_size * rank)] * 2
        # piece j of my y went to rank j, which weighted what it received from me by (my rank + 1)
        assert grad_a2a == [float(rank + 1)] * (2 * world_size)


def not_a_member():
    sub = dist.new_group([0, 1])
    if dist.get_rank() == 2:
        try:
            comm.group_info(sub)
        except ValueError as err:
            return str(err)
    return None


def test_group_the_caller_is_not_in_is_a_value_error():
    results = run_distributed(not_a_member, 3, timeout=30)
    assert results[2].startswith("group: this process")
