"""The harness itself: ranks, results in rank order, errors with tracebacks, timeouts that rebuild the pool."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import RankError, RankTimeout, run_distributed


def rank_and_sum(offset):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_every_rank_runs_with_a_process_group(world_size):
    results = run_distributed(rank_and_sum, world_size, 10)
    expected_sum = sum(r + 10 for r in range(world_size))
    assert results == [(r, world_size, expected_sum) for r in range(world_size)]


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise KeyError("boom on rank one")
    return "fine"


def test_an_exception_on_one_rank_fails_with_its_traceback():
    with pytest.raises(RankError, match=r"rank 1 raised:[\s\S]*KeyError: 'boom on rank one'"):
        run_distributed(fail_on_rank_one, 2)
    assert run_distributed(rank_and_sum, 2, 0) == [(0, 2, 1.0), (1, 2, 1.0)]  # a fresh pool works


def sleep_on_last_rank(seconds):
    if dist.get_rank() == dist.get_world_size() - 1:
        time.sleep(seconds)
    return "done"


def test_a_rank_that_does_not_answer_times_out_and_the_pool_is_rebuilt():
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"ranks \[2\] did not answer"):
        run_distributed(sleep_on_last_rank, 3, 60, timeout=3)
    assert time.monotonic() - start < 30
    assert run_distributed(rank_and_sum, 3, 0) == [(r, 3, 3.0) for r in range(3)]
