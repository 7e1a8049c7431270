"""Overlap efficiency of the SP ops: compute alone vs the same step with its transfers on an emulated link.

    python bench/overlap.py [--world-size 4] [--seq-len 4096]     # ~1 min on a quiet 2-core machine

For each op, on P gloo ranks (one process each):

1. ``compute``: forward and backward times with no link emulation (loopback transfers are nearly free);
2. ``comm``: the time the emulated link needs for what each phase sends, from ``count_comm()``: the busiest
   direction's bytes / bandwidth + (latency + host cost) per transfer (collectives: all their bytes). ZeCO's
   state cannot reach the last rank faster than its relay chain: K pieces over P - 1 hops, (P + K - 2)
   (latency + host + state / K / bandwidth) (``strategies.zeco_scan_time``, K from the op's rule on this link);
3. the bandwidth is set so that the link time of the step equals the compute the op can hide it behind (the
   hardest case a schedule can still hide; found by bisection, as ZeCO's K depends on the link): for the
   softmax ops all of it; for the linear ops the intra-chunk part of each pass
   (``strategies.linear_pass_parts``), because their transfer needs the local state first and the inter-chunk
   part needs what arrived, so no schedule hides a slower link. ``measured`` is the step time with emulation on.

The efficiency is the issue's definition:

    overlap efficiency = compute alone / measured with the transfers on the emulated link

1.0 means every transfer is hidden. ``dependency efficiency`` divides the best step a schedule can reach on
this link instead: max(compute_fwd, comm_fwd) + max(compute_bwd, comm_bwd) for the softmax ops, and for the
linear ops the cost model's bound ``strategies.overlapped_linear_pass`` (before + max(intra-chunk, comm) +
after, each way); ``if fully serial`` is that bound over compute + comm (what an op that does not overlap at all
scores). ``--linear-link compute`` sizes the linear ops' link like the softmax ops' (as slow as all the
compute; the dependency bound is then ~0.6 of compute alone and only the dependency efficiency can reach 1).

Medians of repeats that interleave the compute-only and the emulated runs (these machines are shared; the
emulated step's min-max is recorded as its spread). Link emulation has arrival semantics (``comm.emulation``):
a relay chain (ZeCO's scan, a ring) is charged hop by hop. Writes bench/results/overlap.json with the load
average before and after (other work on a shared machine slows the compute of one rank more than another's).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, print_table, run_ranks, save_results  # noqa: E402

from seqpar import strategies  # noqa: E402
from seqpar.collectives import comm, scan  # noqa: E402
from seqpar.collectives.layout import shard_sequence  # noqa: E402

LATENCY_S = 20e-6
SOFTMAX = ["ring_attention", "token_ring_attention", "ulysses_attention", "allgather_kv_attention"]
LINEAR = ["lasp2_linear_attention", "zeco_linear_attention"]


def _op(name):
    import importlib

    module = {"lasp2_linear_attention": "seqpar.collectives.lasp2", "zeco_linear_attention": "seqpar.collectives.zeco"}
    return getattr(importlib.import_module(module.get(name, "seqpar.collectives")), name)


def _inputs(name: str, seq_len: int):
    gen = torch.Generator().manual_seed(0)
    if name in LINEAR:  # contiguous layout, state 8 heads x 64 x 64
        q, k, v, do = (torch.randn(1, seq_len, 8, 64, generator=gen) * 0.3 for _ in range(4))
        return [shard_sequence(t, layout="contiguous") for t in (q, k, v, do)], {}
    q, k, v, do = (torch.randn(1, seq_len, 8, 64, generator=gen) for _ in range(4))
    return [shard_sequence(t) for t in (q, k, v, do)], {"causal": True}


def measure(names: list[str], seq_len: int, repeats: int, linear_link: str) -> dict:
    # the host time per message on this machine now (emulation headers included), which ZeCO's piece rule and
    # the comm times below charge: on a loaded machine it is larger than any latency a link adds
    comm.set_link_emulation(comm.LinkEmulation(gbps=1e3, latency_s=LATENCY_S))
    host_s = scan.measure_message_host_s()
    scan.set_message_host_s(host_s)
    comm.set_link_emulation(None)
    results = {"host_s_per_message": host_s}
    for name in names:
        try:
            op = _op(name)
        except (ImportError, AttributeError):
            continue
        local, options = _inputs(name, seq_len)

        def forward():
            leaves = [t.clone().requires_grad_(True) for t in local[:3]]
            out = op(*leaves, **options)
            return out[0] if isinstance(out, tuple) else out

        def step():
            forward().backward(local[3])

        def phase_bytes():
            with comm.count_comm() as fwd_stats:
                out = forward()
            with comm.count_comm() as bwd_stats:
                out.backward(local[3])
            return [_link_bytes(fwd_stats), _link_bytes(bwd_stats)]

        comm.set_link_emulation(None)
        compute = median_time(step, repeats=repeats, sync=True)  # sets the bandwidth
        (fwd_bytes, fwd_calls), (bwd_bytes, bwd_calls) = phase_bytes()
        worst = torch.tensor([float(fwd_bytes), float(bwd_bytes), float(fwd_calls), float(bwd_calls), compute])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        fwd_bytes, bwd_bytes, fwd_calls, bwd_calls, compute = worst.tolist()
        if fwd_bytes + bwd_bytes == 0:
            continue
        def comm_times(gbps: float) -> tuple[float, float]:
            if name == "zeco_linear_attention":  # the relay chain: one state per direction, K pieces, P - 1 hops
                return tuple(_zeco_chain_s(nbytes, gbps, host_s) for nbytes in (fwd_bytes, bwd_bytes))
            return tuple(nbytes * 8 / (gbps * 1e9) + calls * (LATENCY_S + host_s)
                         for nbytes, calls in ((fwd_bytes, fwd_calls), (bwd_bytes, bwd_calls)))

        hideable = compute  # what the transfers can hide behind: all the compute, or the linear ops' intra part
        if name in LINEAR and linear_link == "intra":
            compute_fwd_alone = median_time(forward, repeats=repeats, sync=True)
            hideable = sum(strategies.linear_pass_parts(_zeco_shape(0.0), c)[1]
                           for c in (compute_fwd_alone, max(compute - compute_fwd_alone, 0.0)))
        gbps = _link_as_slow_as(hideable, comm_times)
        comm_fwd, comm_bwd = comm_times(gbps)
        # the compute and the emulated step, interleaved: the background load of a shared machine hits both
        emulated = comm.LinkEmulation(gbps=gbps, latency_s=LATENCY_S)
        runs = {"compute_fwd": (forward, None), "compute": (step, None), "measured": (step, emulated)}
        times = {run: [] for run in runs}
        scan_waits = []  # ZeCO: how long the compute thread waits for its relay after the intra-chunk work
        for _ in range(repeats):
            for run, (fn, link_emulation) in runs.items():
                comm.set_link_emulation(link_emulation)
                with _relay_waits() as waits:
                    times[run].append(median_time(fn, repeats=1, warmup=0, sync=True))
                if run == "measured":
                    scan_waits.append(sum(waits))
        comm.set_link_emulation(None)
        compute_fwd, compute, measured = (statistics.median(times[run]) for run in runs)
        compute_bwd = max(compute - compute_fwd, 0.0)
        if name in LINEAR:
            bound = _linear_schedule_bound(compute_fwd, compute_bwd, comm_fwd, comm_bwd)
        else:
            bound = max(compute_fwd, comm_fwd) + max(compute_bwd, comm_bwd)
        results[name] = {"compute_fwd_s": compute_fwd, "compute_bwd_s": compute_bwd, "comm_fwd_s": comm_fwd,
                         "comm_bwd_s": comm_bwd, "hideable_s": hideable, "measured_s": measured, "gbps": gbps,
                         "link_bytes": fwd_bytes + bwd_bytes, "efficiency": compute / measured,
                         "measured_spread_s": [min(times["measured"]), max(times["measured"])],
                         "zeco_pieces": (_zeco_pieces(fwd_bytes, gbps, host_s) if name == "zeco_linear_attention"
                                         else None),
                         "scan_wait_s": statistics.median(scan_waits) if name == "zeco_linear_attention" else None,
                         "dependency_bound_s": bound, "dependency_efficiency": bound / measured,
                         "serial_efficiency": bound / (compute + comm_fwd + comm_bwd)}
    scan.set_message_host_s(None)
    return results


@contextlib.contextmanager
def _relay_waits():
    """The seconds each ``ScanRelay.complete`` (ZeCO joining its relay thread) blocks inside the block: where
    the compute thread waits on the scan instead of computing."""
    waits, complete = [], scan.ScanRelay.complete

    def timed(self):
        start = time.perf_counter()
        try:
            return complete(self)
        finally:
            waits.append(time.perf_counter() - start)

    scan.ScanRelay.complete = timed
    try:
        yield waits
    finally:
        scan.ScanRelay.complete = complete


def _zeco_shape(state_bytes: float) -> strategies.LayerShape:
    return strategies.LayerShape(seq_len=1, degree=dist.get_world_size(), heads=8, kv_heads=8, head_dim=64,
                                 elem_bytes=4, state_bytes=state_bytes)


def _zeco_pieces(state_bytes: float, gbps: float, host_s: float) -> int:
    return strategies.zeco_pieces(_zeco_shape(state_bytes), strategies.Link(gbps * 1e9 / 8, LATENCY_S, host_s))


def _zeco_chain_s(state_bytes: float, gbps: float, host_s: float) -> float:
    """When the last rank has its state: (P - 1 + K - 1) piece hops, K as the op chooses it on this link."""
    link = strategies.Link(gbps * 1e9 / 8, LATENCY_S, host_s)
    return float(strategies.zeco_scan_time(_zeco_shape(state_bytes), link))


def _linear_schedule_bound(compute_fwd: float, compute_bwd: float, comm_fwd: float, comm_bwd: float) -> float:
    """The best a linear SP op can do given its dependencies: the local state before its transfer, the
    inter-chunk part after it (``strategies.overlapped_linear_pass``), each way."""
    shape = _zeco_shape(0.0)
    return float(strategies.overlapped_linear_pass(shape, compute_fwd, comm_fwd)
                 + strategies.overlapped_linear_pass(shape, compute_bwd, comm_bwd))


def _link_as_slow_as(compute_s: float, comm_times) -> float:
    """The bandwidth (Gbit/s) at which the step's link time (forward + backward) equals ``compute_s``: link time
    falls as bandwidth grows, so bisect on log bandwidth (to the fastest tried where latency and host time
    alone exceed ``compute_s``)."""
    lo, hi = 1e-6, 1e3
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if sum(comm_times(mid)) > compute_s else (lo, mid)
    return math.sqrt(lo * hi)


def _link_bytes(stats: comm.CommStats) -> tuple[int, int]:
    """(bytes on the busiest link, number of transfers) of one phase."""
    p2p = stats.bytes_by_direction
    nbytes = (max(p2p.values()) if p2p else 0) + sum(v for k, v in stats.bytes_by_op.items() if k != "send")
    return nbytes, sum(stats.calls.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="*", choices=SOFTMAX + LINEAR, help="default: all")
    parser.add_argument("--linear-link", choices=["intra", "compute"], default="intra",
                        help="the linear ops' link: as slow as their intra-chunk work (default) or all the compute")
    args = parser.parse_args()
    load_before = os.getloadavg()
    res = run_ranks(measure, args.world_size, args.ops or SOFTMAX + LINEAR, args.seq_len, args.repeats,
                    args.linear_link)[0]
    load_after = os.getloadavg()
    host_s = res.pop("host_s_per_message")
    rows = [{"op": name, "overlap efficiency": r["efficiency"], "dependency efficiency": r["dependency_efficiency"],
             "if fully serial": r["serial_efficiency"],
             "compute fwd/bwd ms": f"{1e3 * r['compute_fwd_s']:.0f}/{1e3 * r['compute_bwd_s']:.0f}",
             "comm fwd/bwd ms": f"{1e3 * r['comm_fwd_s']:.0f}/{1e3 * r['comm_bwd_s']:.0f}",
             "measured ms": f"{1e3 * r['measured_s']:.0f}",
             "scan wait ms": None if r["scan_wait_s"] is None else f"{1e3 * r['scan_wait_s']:.1f}",
             "spread ms": "-".join(f"{1e3 * t:.0f}" for t in r["measured_spread_s"]), "emulated Gbit/s": r["gbps"],
             "MB on busiest link": r["link_bytes"] / 1e6}
            for name, r in res.items()]
    print(f"\noverlap efficiency = compute alone / measured on an emulated link as slow as the compute it can hide "
          f"behind: P={args.world_size}, S={args.seq_len}, fwd+bwd, host time per message {1e6 * host_s:.0f} us")
    print_table(rows, list(rows[0]))
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    loaded = max(load_before[0], load_after[0]) > 2.5
    note = ("a shared 2-core machine loaded by other work (see the load averages): the lead re-runs this on a quiet "
            "machine" if loaded else "a quiet machine (load average <= 2.5 before and after)")
    path = save_results("overlap", {"config": {**vars(args), "latency_s": LATENCY_S, "heads": 8, "head_dim": 64},
                                    "note": note, "host_s_per_message": host_s,
                                    "load_average_before": load_before, "load_average_after": load_after,
                                    "ops": res, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
