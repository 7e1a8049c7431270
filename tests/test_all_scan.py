"""All-Scan alone: equal to a sequential prefix scan (both directions, with and without initial state, any
piece count), its gradient equal to autograd through the sequential scan, one state sent per rank, bad input
raising before any transfer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed
from seqpar.collectives import comm
from seqpar.collectives.scan import all_scan
from seqpar.tracing import trace_events

SHAPE = (2, 3, 5, 4)  # (B, H, Dk, Dv)


def sequential_scan(states, decays, initial, reverse):
    """Exclusive scan on one process: entry r is the state entering rank r."""
    order = range(len(states) - 1, -1, -1) if reverse else range(len(states))
    state = torch.zeros_like(states[0]) if initial is None else initial
    out = [None] * len(states)
    for r in order:
        out[r] = state
        state = torch.exp(decays[r])[..., None, None] * state + states[r]
    return out


def scan_cases():
    rank, p = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(5)
    states = torch.randn(p, *SHAPE, generator=gen, dtype=torch.float64)
    decays = -torch.rand(p, *SHAPE[:2], generator=gen, dtype=torch.float64)
    initial = torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    weights = torch.randn(p, *SHAPE, generator=gen, dtype=torch.float64)  # loss weights of each rank's output
    results = []
    for reverse in (False, True):
        for pieces in (None, 1, 2, SHAPE[2]):
            for with_decay, init in ((True, None), (True, initial), (False, initial)):
                d_all = decays if with_decay else torch.zeros_like(decays)
                ref_leaves = [t.clone().requires_grad_(True) for t in (states, d_all)]
                init_leaf = None if init is None else init.clone().requires_grad_(True)
                ref = sequential_scan(ref_leaves[0], ref_leaves[1], init_leaf, reverse)
                ref_loss = sum((ref[r] * weights[r]).sum() for r in range(p))
                ref_loss = ref_loss + 0 * sum(t.sum() for t in ref_leaves)  # P = 1: may not depend on them
                wanted = ref_leaves + ([init_leaf] if init_leaf is not None else [])
                ref_grads = torch.autograd.grad(ref_loss, wanted, allow_unused=True)

                m = states[rank].clone().requires_grad_(True)
                d = decays[rank].clone().requires_grad_(True) if with_decay else None
                i0 = None if init is None else init.clone().requires_grad_(True)
                with comm.count_comm() as stats:
                    got = all_scan(m, d, num_pieces=pieces, initial_state=i0, reverse=reverse)
                (got * weights[rank]).sum().backward()
                results.append({
                    "case": (reverse, pieces, with_decay, init is not None),
                    "value": (got - ref[rank].detach()).abs().max().item(),
                    "dM": (m.grad - ref_grads[0][rank]).abs().max().item(),
                    "dD": 0.0 if d is None else (d.grad - ref_grads[1][rank]).abs().max().item(),
                    "d_initial": None if i0 is None else i0.grad,
                    "ref_d_initial": None if i0 is None else ref_grads[2],
                    "bytes": stats.bytes_sent,
                    "sends": stats.calls.get("send", 0),
                })
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_all_scan_equals_the_sequential_prefix_scan(world_size):
    per_rank = run_distributed(scan_cases, world_size)
    state_bytes = 8 * 2 * 3 * 5 * 4
    for index, first in enumerate(per_rank[0]):
        reverse, pieces, _, has_init = first["case"]
        for rank, results in enumerate(per_rank):
            res = results[index]
            assert max(res["value"], res["dM"], res["dD"]) < 1e-12, (rank, res["case"])
            last = 0 if reverse else world_size - 1
            assert res["bytes"] == (0 if rank == last else state_bytes), (rank, res["case"])
            assert res["sends"] == (0 if rank == last else (pieces or SHAPE[2]))
        if has_init:  # whole-held: the partials over ranks sum to the full gradient
            total = sum(results[index]["d_initial"] for results in per_rank)
            assert (total - first["ref_d_initial"]).abs().max().item() < 1e-12


def scan_bad_input():
    m = torch.zeros(*SHAPE)
    calls = {
        "local_state": lambda: all_scan(torch.zeros(3), None),
        "local_log_decay": lambda: all_scan(m, torch.zeros(2, 4)),
        "positive": lambda: all_scan(m, torch.full(SHAPE[:2], 0.5)),
        "num_pieces": lambda: all_scan(m, None, num_pieces=SHAPE[2] + 1),
        "initial_state": lambda: all_scan(m, None, initial_state=torch.zeros(2, 3, 5, 5)),
    }
    out = {}
    for name, call in calls.items():
        with comm.count_comm() as stats, trace_events() as events:
            try:
                call()
                message = None
            except ValueError as err:
                message = str(err)
        out[name] = (message, stats.bytes_sent, len(events))
    return out


def test_all_scan_bad_input_raises_on_every_rank_before_any_transfer():
    expected = {"local_state": "local_state", "local_log_decay": "local_log_decay", "positive": "local_log_decay",
                "num_pieces": "num_pieces", "initial_state": "initial_state"}
    for out in run_distributed(scan_bad_input, 2):
        for name, (message, sent, events) in out.items():
            assert message is not None and message.startswith(expected[name] + ":"), (name, message)
            assert sent == 0 and events == 0


# ------------------------------------------------------------------------------------------------------
# GLA: one decay per key row of the state
# ------------------------------------------------------------------------------------------------------


def per_row_cases():
    """The scan with a (B, H, Dk) decay per rank (each key row of a state decays by its own factor), against a
    sequential scan written out row by row; value and gradients of M, D and the initial state."""
    rank, p = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(9)
    states = torch.randn(p, *SHAPE, generator=gen, dtype=torch.float64)
    decays = -torch.rand(p, *SHAPE[:3], generator=gen, dtype=torch.float64)
    initial = torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    weights = torch.randn(p, *SHAPE, generator=gen, dtype=torch.float64)
    out = []
    for reverse in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (states, decays, initial)]
        order = range(p - 1, -1, -1) if reverse else range(p)
        state, ref = leaves[2], [None] * p
        for r in order:
            ref[r] = state
            state = torch.stack([torch.exp(leaves[1][r][..., i])[..., None] * state[..., i, :]
                                 for i in range(SHAPE[2])], -2) + leaves[0][r]
        ref_grads = torch.autograd.grad(sum((ref[r] * weights[r]).sum() for r in range(p)) + 0 * leaves[1].sum()
                                        + 0 * leaves[0].sum(), leaves)
        m, d, i0 = (t.clone().requires_grad_(True) for t in (states[rank], decays[rank], initial))
        got = all_scan(m, d, num_pieces=2, initial_state=i0, reverse=reverse)
        (got * weights[rank]).sum().backward()
        out.append({"value": (got - ref[rank]).abs().max().item(),
                    "dM": (m.grad - ref_grads[0][rank]).abs().max().item(),
                    "dD": (d.grad - ref_grads[1][rank]).abs().max().item(),
                    "d_initial": i0.grad, "ref_d_initial": ref_grads[2]})
    return out


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_all_scan_with_a_decay_per_key_row(world_size):
    per_rank = run_distributed(per_row_cases, world_size)
    for index in range(2):
        for rank, results in enumerate(per_rank):
            res = results[index]
            assert max(res["value"], res["dM"], res["dD"]) < 1e-12, (rank, index, res)
        total = sum(results[index]["d_initial"] for results in per_rank)
        assert (total - per_rank[0][index]["ref_d_initial"]).abs().max().item() < 1e-12


def test_piece_count_rule():
    from seqpar.collectives.scan import LATENCY_BYTES, choose_pieces

    assert choose_pieces(1, 10**9, 128) == choose_pieces(2, 10**9, 128) == 1  # nothing to pipeline through
    assert choose_pieces(8, LATENCY_BYTES, 128) == round(6 ** 0.5)  # sqrt((P - 2) N / LATENCY_BYTES)
    assert choose_pieces(256, 16 * LATENCY_BYTES, 128) == round((254 * 16) ** 0.5)  # 64 pieces at P = 256
    assert choose_pieces(256, 128 * LATENCY_BYTES, 128) == 128  # clamped to Dk
    assert choose_pieces(4, 64 * LATENCY_BYTES, 64) == round((2 * 64) ** 0.5)


def test_piece_count_comes_from_the_links_latency_bandwidth_product():
    """K = sqrt((P - 2) N / (alpha / beta)): a slow link with small latency cuts the state finer; the op takes
    the emulated link's product, the cost model its Link's, and both charge the same K."""
    from seqpar import strategies
    from seqpar.collectives import comm
    from seqpar.collectives import scan
    from seqpar.collectives.scan import LATENCY_BYTES, choose_pieces, link_latency_bytes

    assert choose_pieces(4, 131072, 64, latency_bytes=32768) == 3  # sqrt(2 * 4) = 2.8
    assert choose_pieces(4, 131072, 64, latency_bytes=8) == 64  # sqrt(2 * 16384) = 181, clamped to Dk
    assert choose_pieces(8, 131072, 64, latency_bytes=0) == 64  # no latency: as fine as Dk allows
    scan.set_message_host_s(0.0)  # the link alone (the host time per message is charged below)
    try:
        assert link_latency_bytes() == LATENCY_BYTES  # no emulation: the default assumption
        comm.set_link_emulation(comm.LinkEmulation(gbps=0.008, latency_s=20e-6))  # 1 MB/s x 20 us = 20 bytes
        assert link_latency_bytes() == pytest.approx(20.0)
    finally:
        comm.set_link_emulation(None)
        scan.set_message_host_s(None)
    shape = strategies.LayerShape(seq_len=4096, degree=4, heads=8, kv_heads=8, head_dim=64, elem_bytes=4,
                                  state_bytes=131072)
    link = strategies.Link(1e6, 20e-6)
    k = strategies.zeco_pieces(shape, link)
    assert k == choose_pieces(4, 131072, 64, latency_bytes=20.0) == 64
    assert strategies.zeco_scan_time(shape, link) == pytest.approx((4 - 1 + k - 1) * (131072 / k / 1e6 + 20e-6))


def test_piece_rule_and_cost_model_charge_the_host_time_per_message(monkeypatch):
    """alpha = latency + host time per message: a host cost that dominates the latency gives fewer, larger
    pieces, in the op's rule and the cost model alike, and the scan time charges it on every piece hop."""
    from seqpar import strategies
    from seqpar.collectives import comm, scan

    monkeypatch.delenv("SEQPAR_SCAN_HOST_US", raising=False)
    assert scan.message_host_s() == scan.HOST_S_PER_MESSAGE
    monkeypatch.setenv("SEQPAR_SCAN_HOST_US", "980")
    comm.set_link_emulation(comm.LinkEmulation(gbps=0.008, latency_s=20e-6))  # 1 MB/s
    try:
        assert scan.link_latency_bytes() == pytest.approx((20e-6 + 980e-6) * 1e6)  # 1000 bytes
        scan.set_message_host_s(0.0)  # the setter wins over the environment
        assert scan.link_latency_bytes() == pytest.approx(20.0)
    finally:
        comm.set_link_emulation(None)
        scan.set_message_host_s(None)
    monkeypatch.setenv("SEQPAR_SCAN_HOST_US", "fast")
    with pytest.raises(ValueError, match="SEQPAR_SCAN_HOST_US"):
        scan.message_host_s()
    with pytest.raises(ValueError, match="seconds"):
        scan.set_message_host_s(-1.0)

    shape = strategies.LayerShape(seq_len=4096, degree=4, heads=8, kv_heads=8, head_dim=64, elem_bytes=4,
                                  state_bytes=131072)
    bare, loaded = strategies.Link(1e6, 20e-6), strategies.Link(1e6, 20e-6, host_s=980e-6)
    assert strategies.zeco_pieces(shape, bare) == 64  # sqrt(2 * 131072 / 20) = 114, clamped to Dk
    k = strategies.zeco_pieces(shape, loaded)
    assert k == round((2 * 131072 / 1000) ** 0.5) == 16
    assert strategies.zeco_scan_time(shape, loaded) == pytest.approx((4 - 1 + k - 1) * (131072 / k / 1e6 + 1e-3))
    # the piece count the host-aware rule picks is the better one on the loaded link
    chain = lambda pieces: (4 + pieces - 2) * (131072 / pieces / 1e6 + 1e-3)  # noqa: E731
    assert chain(16) < chain(64)
    assert strategies.lasp2_gather_time(shape, loaded) == pytest.approx(3 * (131072 / 1e6 + 20e-6) + 980e-6)


def measure_host(pieces):
    from seqpar.collectives import scan

    link = comm.LinkEmulation(gbps=1.0, latency_s=20e-6)
    comm.set_link_emulation(link)
    try:
        host_s = scan.measure_message_host_s(pieces=pieces, repeats=1)
        restored = comm.emulation.link_emulation() is link
    finally:
        comm.set_link_emulation(None)
    try:
        scan.measure_message_host_s(pieces=1)
        bad = None
    except ValueError as err:
        bad = str(err)
    return {"host_s": host_s, "restored": restored, "bad": bad}


@pytest.mark.parametrize("world_size", [1, 3])
def test_measured_host_time_per_message_is_agreed_and_leaves_the_link_as_it_was(world_size):
    results = run_distributed(measure_host, world_size, 4)
    assert len({r["host_s"] for r in results}) == 1  # every rank gets the same figure (it chooses K itself)
    host_s = results[0]["host_s"]
    assert host_s == 0.0 if world_size == 1 else 0.0 <= host_s < 1.0  # seconds; no relay at P = 1
    assert all(r["restored"] for r in results)
    assert all(r["bad"] is not None and "pieces" in r["bad"] for r in results)
