"""Link emulation with arrival semantics: receivers wait for the emulated arrival, so chains are charged per hop.

Times are compared across ranks on ``emulation.clock()`` (CLOCK_MONOTONIC, one clock for the processes of a
host). Lower bounds are exact (what the emulated link must charge); upper bounds allow for a loaded machine.
"""

import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed
from seqpar.collectives import comm
from seqpar.collectives.comm import emulation

SLACK_S = 0.35  # upward tolerance only: gloo, Python and a shared 2-core machine add time, never remove it


def relay_chain(numel: int, gbps: float, latency_s: float):
    """Rank 0 sends a tensor to rank 1, which forwards it to rank 2 once it has it, ... up to rank P - 1."""
    rank, p = dist.get_rank(), dist.get_world_size()
    comm.set_link_emulation(comm.LinkEmulation(gbps=gbps, latency_s=latency_s))
    try:
        dist.barrier()
        x = torch.full((numel,), 7.0)
        first_send = None
        if rank > 0:
            x = comm.recv(torch.empty(numel), rank - 1).wait()
        arrived = emulation.clock()
        if rank < p - 1:
            first_send = emulation.clock()
            comm.send(x, rank + 1).wait()
        return {"first_send": first_send, "arrived": arrived, "value_ok": bool((x == 7.0).all())}
    finally:
        comm.set_link_emulation(None)


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_chain_of_hops_arrives_after_every_hop_is_charged(world_size):
    numel, gbps, latency_s = 100_000, 0.4, 0.005  # 400 KB: 8 ms per hop on the link, + 5 ms latency
    hop_s = numel * 4 * 8 / (gbps * 1e9) + latency_s
    res = run_distributed(relay_chain, world_size, numel, gbps, latency_s)
    assert all(r["value_ok"] for r in res)
    elapsed = res[-1]["arrived"] - res[0]["first_send"]
    expected = (world_size - 1) * hop_s
    assert expected <= elapsed <= expected + SLACK_S, (elapsed, expected)


def ring_overlap(numel: int, gbps: float, compute_s: float, bidirectional: bool):
    """One ring exchange with ``compute_s`` of (sleeping) compute between posting and waiting."""
    comm.set_link_emulation(comm.LinkEmulation(gbps=gbps, latency_s=0.0))
    try:
        x = torch.ones(numel)
        dist.barrier()
        start = emulation.clock()
        if bidirectional:
            pending = comm.ring_exchange_bidirectional(x, x)
        else:
            pending = comm.ring_exchange(x, direction="next")
        time.sleep(compute_s)
        pending.wait()
        return emulation.clock() - start
    finally:
        comm.set_link_emulation(None)


def test_ring_exchange_overlaps_compute_and_both_directions_run_at_once():
    numel, gbps = 250_000, 0.1  # 1 MB: 80 ms on the link
    transfer_s = numel * 4 * 8 / (gbps * 1e9)
    # compute as long as the transfer: overlapped ~ max(C, T) = T, serial would be 2T
    for elapsed in run_distributed(ring_overlap, 3, numel, gbps, transfer_s, False):
        assert transfer_s <= elapsed <= 1.5 * transfer_s, elapsed
    # both directions at once, no compute: each direction has its own link, so ~T, not 2T
    for elapsed in run_distributed(ring_overlap, 3, numel, gbps, 0.0, True):
        assert transfer_s <= elapsed <= 1.5 * transfer_s, elapsed


def late_all_gather(numel: int, gbps: float, latency_s: float, late_s: float):
    """All-gather where the last rank joins ``late_s`` after the others."""
    rank, p = dist.get_rank(), dist.get_world_size()
    comm.set_link_emulation(comm.LinkEmulation(gbps=gbps, latency_s=latency_s))
    try:
        dist.barrier()
        if rank == p - 1:
            time.sleep(late_s)
        start = emulation.clock()
        gathered = comm.all_gather(torch.full((numel,), float(rank)))
        done = emulation.clock()
        return {"start": start, "done": done, "ok": gathered[:, 0].tolist() == [float(j) for j in range(p)]}
    finally:
        comm.set_link_emulation(None)


def test_a_collective_completes_after_the_latest_participant_start_plus_its_transfer():
    p, numel, gbps, latency_s, late_s = 4, 50_000, 0.5, 0.004, 0.1
    res = run_distributed(late_all_gather, p, numel, gbps, latency_s, late_s)
    latest_start = max(r["start"] for r in res)
    expected = latest_start + (p - 1) * (numel * 4 * 8 / (gbps * 1e9) + latency_s)  # ring: P - 1 rounds
    for r in res:
        assert r["ok"]
        assert expected <= r["done"] <= expected + SLACK_S, (r["done"] - expected)


def posted_messages(emulate: bool):
    """How many gloo sends/receives/collectives one exchange and one all-gather post, and the bytes counted."""
    counts = {"isend": 0, "irecv": 0, "collectives": 0}
    originals = {name: getattr(dist, name) for name in ("isend", "irecv")}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    from seqpar.collectives.comm import transport

    original_gather = transport._all_gather_single

    def counting_gather(*args, **kwargs):
        counts["collectives"] += 1
        return original_gather(*args, **kwargs)

    rank, p = dist.get_rank(), dist.get_world_size()
    comm.set_link_emulation(comm.LinkEmulation(gbps=100.0) if emulate else None)
    dist.isend, dist.irecv, transport._all_gather_single = counting("isend"), counting("irecv"), counting_gather
    try:
        with comm.count_comm() as stats:
            got = comm.ring_exchange_bidirectional(torch.full((5,), float(rank)), torch.ones(3)).wait()
            gathered = comm.all_gather(torch.full((2,), float(rank)))
    finally:
        dist.isend, dist.irecv = originals["isend"], originals["irecv"]
        transport._all_gather_single = original_gather
        comm.set_link_emulation(None)
    ok = got[0][0].item() == (rank - 1) % p and gathered[:, 0].tolist() == [float(j) for j in range(p)]
    return {"counts": counts, "bytes": stats.bytes_sent, "by_op": dict(stats.bytes_by_op), "ok": ok}


def test_emulation_off_posts_nothing_extra_and_headers_are_not_counted():
    off = run_distributed(posted_messages, 3, False)
    on = run_distributed(posted_messages, 3, True)
    for r_off, r_on in zip(off, on):
        assert r_off["ok"] and r_on["ok"]
        assert r_off["counts"] == {"isend": 2, "irecv": 2, "collectives": 1}  # exactly the algorithm's messages
        assert r_on["counts"] == {"isend": 4, "irecv": 4, "collectives": 2}  # + one header each, + the starts
        assert r_off["bytes"] == r_on["bytes"] == 20 + 12 + 8 * 2  # the headers count as zero bytes
        assert r_off["by_op"] == r_on["by_op"]


@pytest.mark.parametrize("spec", ["", "fast", "0", "-1,20", "1,2,3", "1,-5"])
def test_bad_emulate_link_variable_is_a_value_error_naming_it(monkeypatch, spec):
    monkeypatch.setenv("SEQPAR_EMULATE_LINK", spec)
    if spec == "":
        assert emulation._link_from_env() is None
        return
    with pytest.raises(ValueError, match="SEQPAR_EMULATE_LINK"):
        emulation._link_from_env()


def test_emulate_link_variable_sets_bandwidth_and_latency(monkeypatch):
    monkeypatch.setenv("SEQPAR_EMULATE_LINK", "2.5,20")
    link = emulation._link_from_env()
    assert link.gbps == 2.5 and link.latency_s == pytest.approx(20e-6, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# The cost model charges what the emulated link does (seqpar.strategies' schedules)
# ----------------------------------------------------------------------------------------------------


def piece_relay(pieces: int, piece_numel: int, gbps: float, latency_s: float):
    """ZeCO's scan shape: rank 0 sends K pieces; every other rank forwards each piece as soon as it has it."""
    rank, p = dist.get_rank(), dist.get_world_size()
    comm.set_link_emulation(comm.LinkEmulation(gbps=gbps, latency_s=latency_s))
    try:
        dist.barrier()
        start, sends = emulation.clock(), []
        for j in range(pieces):
            piece = torch.full((piece_numel,), float(j))
            if rank > 0:
                piece = comm.recv(torch.empty(piece_numel), rank - 1).wait()
            if rank < p - 1:
                sends.append(comm.send(piece, rank + 1))
        for pending in sends:
            pending.wait()
        return {"start": start, "done": emulation.clock()}
    finally:
        comm.set_link_emulation(None)


def test_the_cost_models_scan_time_is_what_the_emulated_link_charges_a_piecewise_relay():
    from seqpar import strategies

    p, dk, state_numel, gbps, latency_s = 4, 64, 50_000, 0.2, 0.003  # a 200 KB state, 3 ms per message
    shape = strategies.LayerShape(seq_len=1024, degree=p, heads=1, kv_heads=1, head_dim=dk, elem_bytes=4,
                                  state_bytes=state_numel * 4)
    link = strategies.Link(gbps * 1e9 / 8, latency_s)
    pieces = strategies.zeco_pieces(shape, link)
    piece_numel = state_numel // pieces
    assert piece_numel * pieces == state_numel
    predicted = strategies.zeco_scan_time(shape, link)
    assert predicted == pytest.approx((p - 1 + pieces - 1) * (piece_numel * 4 * 8 / (gbps * 1e9) + latency_s))
    res = run_distributed(piece_relay, p, pieces, piece_numel, gbps, latency_s)
    elapsed = res[-1]["done"] - res[0]["start"]
    assert predicted <= elapsed <= predicted + SLACK_S, (elapsed, predicted)


@pytest.mark.parametrize("bytes_per_s", [1e12, 1e6])  # the transfer hidden behind the intra-chunk work / not
def test_linear_entries_charge_local_state_then_transfer_over_intra_chunk_then_inter_chunk(bytes_per_s):
    from seqpar import strategies

    p, heads, d, fwd, bwd, lam = 4, 2, 64, 0.03, 0.06, 1e-5
    state = heads * d * d * 4
    shape = strategies.LayerShape(seq_len=4096, degree=p, heads=heads, kv_heads=heads, head_dim=d, elem_bytes=4,
                                  state_bytes=state)
    link = strategies.Link(bytes_per_s, lam)
    third = 1 / 3  # C = D = 64: state 2 D^2, intra 2 C D, inter 2 D^2 of the 2 C D + 4 D^2 per token and head
    gather = (p - 1) * (state / bytes_per_s + lam)
    pieces = strategies.zeco_pieces(shape, link)
    scan = (p - 1 + pieces - 1) * (state / pieces / bytes_per_s + lam)
    for name, comm_s in (("lasp2", gather), ("zeco", scan)):
        expected = sum(2 * third * a + max(third * a, comm_s) for a in (fwd, bwd))
        assert strategies.get(name).layer_time(shape, fwd, bwd, link) == pytest.approx(expected, rel=1e-12), name

