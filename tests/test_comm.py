"""Communication primitives: values moved correctly and bytes counted exactly by the documented convention."""

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed
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


# ----------------------------------------------------------------------------------------------------
# The batched exchange: every point-to-point post in seqpar
# ----------------------------------------------------------------------------------------------------


def batched_exchange():
    """Every rank sends a different tensor to every other rank (explicit-peer tag) and one to rank + 1 (ring tag),
    all in one exchange; receive buffers given as tensors and as (shape, dtype)."""
    rank, p = dist.get_rank(), dist.get_world_size()
    peers = [j for j in range(p) if j != rank]
    sends = [(torch.full((j + 1,), float(100 * rank + j)), j, comm.tags.P2P) for j in peers]
    sends.append((torch.full((2, 3), float(rank), dtype=torch.float64), (rank + 1) % p, comm.tags.ring_tag("next", 0)))
    recvs = [(torch.empty(rank + 1), j, comm.tags.P2P) for j in peers]
    recvs.append((((2, 3), torch.float64), (rank - 1) % p, comm.tags.ring_tag("next", 0)))
    with comm.count_comm() as c, trace_events() as events:
        got = comm.exchange(sends, recvs).wait()
    return {
        "from_peers": [t.tolist() for t in got[:-1]],
        "from_prev": got[-1].tolist(),
        "by_peer": c.bytes_by_peer,
        "by_direction": c.bytes_by_direction,
        "calls": c.calls,
        "waits": sum(e["kind"] == "wait" for e in events),
    }


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_exchange_pairs_up_many_messages_and_counts_them_per_peer_and_direction(world_size):
    p = world_size
    for rank, res in enumerate(run_distributed(batched_exchange, p)):
        peers = [j for j in range(p) if j != rank]
        assert res["from_peers"] == [[float(100 * j + rank)] * (rank + 1) for j in peers]
        assert res["from_prev"] == [[float((rank - 1) % p)] * 3] * 2
        expected = {j: 4 * (j + 1) for j in peers}
        expected[(rank + 1) % p] += 48  # the float64 (2, 3) ring message
        assert res["by_peer"] == expected
        assert res["by_direction"] == {"next": 48}  # the explicit-peer tag is not a ring direction
        assert res["calls"] == {"send": p}
        assert res["waits"] == 1  # one PendingTransfer for the whole batch


def exchange_with_itself():
    try:
        comm.exchange([(torch.zeros(1), dist.get_rank(), comm.tags.P2P)], [])
    except ValueError as err:
        return str(err)
    return None


def test_exchange_refuses_a_peer_that_is_this_rank_before_posting():
    for message in run_distributed(exchange_with_itself, 2):
        assert message is not None and message.startswith("dst: peers must be other ranks")


def test_every_tag_in_seqpar_is_in_the_one_table_with_its_direction():
    from seqpar.collectives import scan, token_ring, zeco

    owner = {tag: block for block in comm.tags.TABLE for tag in block.tags()}
    assert len(owner) == sum(block.count for block in comm.tags.TABLE)  # no tag in two blocks
    used = {
        token_ring._TAG_QUERIES: "prev", token_ring._TAG_PARTIALS: "next",
        scan.TAG_SCAN_NEXT: "next", scan.TAG_SCAN_NEXT + scan.MAX_PIECES - 1: "next",
        scan.TAG_SCAN_PREV: "prev", scan.TAG_SCAN_PREV + scan.MAX_PIECES - 1: "prev",
        zeco.TAG_FINAL_STATE: None, zeco.TAG_FINAL_GRAD: None, comm.TAG_P2P: None,
        comm.tags.ring_tag("next", comm.tags.RING_STREAMS - 1): "next", comm.tags.ring_tag("prev", 1): "prev",
    }
    for tag, direction in used.items():
        assert tag in owner, tag
        assert comm.tags.direction_of(tag) == direction, (tag, owner[tag].name)
    with pytest.raises(ValueError, match="stream"):
        comm.tags.ring_tag("next", comm.tags.RING_STREAMS)


# ----------------------------------------------------------------------------------------------------
# SEQPAR_COMM_TIMEOUT_S: validated, not silently unbounded or broken
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf", "nan", "1e30"])
def test_bad_timeout_is_a_value_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("SEQPAR_COMM_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=r"^SEQPAR_COMM_TIMEOUT_S: must be a finite number of seconds > 0") as info:
        comm.default_timeout()
    assert repr(value) in str(info.value) and "unset it" in str(info.value)


@pytest.mark.parametrize(("value", "seconds"), [(None, 300.0), ("", 300.0), ("2.5", 2.5), (" 600 ", 600.0)])
def test_valid_timeout_is_used(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv("SEQPAR_COMM_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("SEQPAR_COMM_TIMEOUT_S", value)
    assert comm.default_timeout().total_seconds() == seconds


def op_with_bad_timeout():
    import os

    import seqpar

    previous = os.environ.get("SEQPAR_COMM_TIMEOUT_S")
    os.environ["SEQPAR_COMM_TIMEOUT_S"] = "-1"
    try:
        with comm.count_comm() as c:
            q = torch.randn(1, 4, 2, 8)
            seqpar.ring_attention(q, q, q, causal=True)
        return None, c.calls
    except ValueError as err:
        return str(err), c.calls
    finally:
        os.environ["SEQPAR_COMM_TIMEOUT_S"] = previous if previous is not None else "60"


def test_a_bad_timeout_fails_every_rank_before_anything_is_sent():
    for message, calls in run_distributed(op_with_bad_timeout, 2, timeout=30):
        assert message is not None and message.startswith("SEQPAR_COMM_TIMEOUT_S"), message
        assert calls == {}


def under_link_emulation(fn):
    """Run ``fn`` with a fast emulated link: the header messages emulation adds must not disturb what moves."""
    comm.set_link_emulation(comm.LinkEmulation(gbps=50.0, latency_s=1e-6))
    try:
        return fn()
    finally:
        comm.set_link_emulation(None)


@pytest.mark.parametrize("world_size", [2, 3])
def test_primitives_and_batched_exchanges_are_unchanged_under_link_emulation(world_size):
    for r, res in enumerate(run_distributed(under_link_emulation, world_size, exercise_primitives)):
        assert all(res["values"]), (r, res["values"])
        assert res["bytes"] == res["expected"]  # the emulation's headers are not counted
        assert res["direction"] == {"next": 120, "prev": 120}
    p = world_size
    for rank, res in enumerate(run_distributed(under_link_emulation, world_size, batched_exchange)):
        peers = [j for j in range(p) if j != rank]
        assert res["from_peers"] == [[float(100 * j + rank)] * (rank + 1) for j in peers]
        assert res["from_prev"] == [[float((rank - 1) % p)] * 3] * 2
        assert res["calls"] == {"send": p}


def all_to_all_single_pieces():
    rank, p = dist.get_rank(), dist.get_world_size()
    send = torch.stack([torch.full((2, 3), float(10 * rank + j)) for j in range(p)])  # piece j goes to rank j
    before = send._use_count()
    with comm.count_comm() as c:
        got = comm.all_to_all_single(send, group=None)
    released = send._use_count() == before  # (views of send, made below, would count too)
    errors = []
    for bad in (send[:, :, :2], send[:1]):  # not contiguous; dim 0 is not the group size (raised before sending)
        try:
            comm.all_to_all_single(bad)
        except ValueError as err:
            errors.append(str(err).split(":")[0])
    return {"from": got[:, 0, 0].tolist(), "bytes": c.bytes_sent, "calls": c.calls,
            "released": released, "errors": errors}


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_to_all_single_moves_pieces_counts_bytes_and_lets_go_of_its_buffers(world_size):
    p = world_size
    for rank, res in enumerate(run_distributed(all_to_all_single_pieces, p)):
        assert res["from"] == [float(10 * j + rank) for j in range(p)]
        assert res["bytes"] == 6 * 4 * (p - 1) and res["calls"] == {"all_to_all": 1}
        assert res["released"]  # gloo's threads hold no reference when it returns: dropping it frees it there
        assert res["errors"] == ["tensor", "tensor"]
