"""Failure paths: inconsistent calls across ranks, a rank dying mid-collective, and the bad-input matrix.
Every one must end in a clear error on every surviving rank within a bounded time, never a hang."""

import os
import time

import pytest
import torch
import torch.distributed as dist
from tests.harness import RankError, RankTimeout, run_distributed

import seqpar
from seqpar.collectives import comm
from seqpar.collectives import softmax_common


def inconsistent_causal():
    comm.set_consistency_checks(True)
    try:
        q = torch.randn(1, 4, 2, 8)
        seqpar.ring_attention(q, q, q, causal=dist.get_rank() != 2)
        return None
    except ValueError as err:
        return str(err)
    finally:
        comm.set_consistency_checks(False)


def test_consistency_check_names_the_ranks_that_differ_on_every_rank():
    messages = run_distributed(inconsistent_causal, 3, timeout=30)
    for message in messages:
        assert message is not None and message.startswith("ring_attention: ranks [2]")


def die_mid_ring(phase):
    """Rank 1 exits abruptly when its second block kernel of the given phase starts."""
    os.environ["SEQPAR_COMM_TIMEOUT_S"] = "5"  # the bound on every wait; the test asserts it is honoured
    calls = {"n": 0}
    name = "attend_and_merge" if phase == "forward" else "attend_block_backward"
    original = getattr(softmax_common, name)

    def dying(*args, **kwargs):
        calls["n"] += 1
        if dist.get_rank() == 1 and calls["n"] == 2:
            os._exit(17)
        return original(*args, **kwargs)

    import seqpar.collectives.ring as ring

    assert hasattr(ring, name), name  # the patch must hit the function the ring really calls
    setattr(ring, name, dying)
    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    start = time.monotonic()
    try:
        out = seqpar.ring_attention(q, q, q, causal=True)
        out.sum().backward()
    finally:
        setattr(ring, name, original)
    return time.monotonic() - start


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_rank_dying_mid_ring_step_gives_errors_naming_the_peer(phase):
    start = time.monotonic()
    with pytest.raises((RankError, RankTimeout)) as info:
        run_distributed(die_mid_ring, 4, phase, timeout=60)
    message = str(info.value)
    assert "ranks [1] did not answer" in message  # only the dead rank; every survivor raised
    for rank, peers in ((0, "3, 1"), (2, "1, 3"), (3, "2, 0")):
        assert f"--- rank {rank} raised" in message
        assert f"seqpar: ring exchange on rank {rank} (peers {peers}) failed or timed out" in message
    assert time.monotonic() - start < 45


def die_mid_all_scan():
    """Rank 1 exits after forwarding the first piece of its state; the ranks after it wait on the rest."""
    os.environ["SEQPAR_COMM_TIMEOUT_S"] = "5"
    from seqpar.collectives import scan as scan_module

    original = scan_module.comm.send
    sent = {"n": 0}

    def dying_send(*args, **kwargs):
        sent["n"] += 1
        if dist.get_rank() == 1 and sent["n"] == 2:
            os._exit(19)
        return original(*args, **kwargs)

    scan_module.comm.send = dying_send
    try:
        state = torch.randn(1, 2, 8, 4)
        return scan_module.all_scan(state, -torch.rand(1, 2), num_pieces=4)
    finally:
        scan_module.comm.send = original


def test_a_rank_dying_mid_all_scan_gives_errors_on_the_others():
    start = time.monotonic()
    with pytest.raises((RankError, RankTimeout)) as info:
        run_distributed(die_mid_all_scan, 4, timeout=60)
    message = str(info.value)
    assert "ranks [1] did not answer" in message  # every survivor raised instead of hanging
    for rank in (2, 3):  # downstream of the dead rank: they raise instead of waiting forever
        assert f"--- rank {rank} raised" in message
    # rank 2, the dead rank's successor, names it (whether the receive failed when posted or when waited on)
    rank2 = message.split("--- rank 2 raised")[1].split("--- rank")[0]
    assert "seqpar: " in rank2 and "rank 1 failed or timed out" in rank2, rank2[-800:]
    assert time.monotonic() - start < 45
