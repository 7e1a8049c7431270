"""Sub-groups created at different times on different ranks: members must find each other whatever else each
rank created before (torch names a locally synchronised group by the process's group count)."""

import torch
import torch.distributed as dist

from seqpar.collectives.groups import split_consecutive, subgroup
from tests.harness import run_distributed

# plans an auto run can make on 8 ranks, in this order: by the third, rank 0 has been in two groups ([0, 1],
# [0]) and rank 2 in one ([2, 3]), so before the fix [0, 1, 2, 3] got a different name on each and timed out
PLANS = [[[0, 1], [2, 3], [4, 5, 6, 7]], [[0], [1], [2, 3], [4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]],
         [[0, 1], [2], [3], [4, 5], [6, 7]], [[0, 1, 2, 3], [4], [5], [6, 7]]]


def sums_over_each_plans_groups(extra_groups_on_rank_zero: int):
    rank = dist.get_rank()
    for _ in range(extra_groups_on_rank_zero if rank == 0 else 0):
        dist.new_group([0], use_local_synchronization=True)  # a user's group that only rank 0 knows of
    sums = []
    for plan in PLANS:
        mine = next(g for g in plan if rank in g)
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=subgroup(None, mine))
        sums.append(value.item())
    inner, outer = split_consecutive(None, 2)  # USP's groups after all of that
    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=outer)
    return sums, value.item()


def test_groups_of_an_auto_runs_plans_meet_whatever_each_rank_created_before():
    for extra in (0, 2):
        results = run_distributed(sums_over_each_plans_groups, 8, extra, timeout=240)
        for rank, (sums, outer_sum) in enumerate(results):
            assert sums == [float(sum(next(g for g in plan if rank in g))) for plan in PLANS]
            assert outer_sum == float(sum(range(rank % 2, 8, 2)))
