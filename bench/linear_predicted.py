"""The cost model's LASP-2 / ZeCO step time against the measured one, on emulated links, P = 2, 4, 8.

    python bench/linear_predicted.py [--quick]        # ~3 min (--quick ~1.5 min) on a quiet 2-core machine

For each P, in ONE run of P gloo ranks (one process each):

0. Host time per message: ``scan.measure_message_host_s`` on the P ranks with link emulation on (a relay of
   a tiny state in 16 pieces and in one: what each extra piece hop costs the host: the relay thread waking,
   the emulation's header, posting the send), set on every rank (``scan.set_message_host_s``) so that ZeCO's
   piece rule charges it, and given to the cost model's ``Link(host_s=...)``, which charges it per ZeCO piece
   hop and per LASP-2 all-gather. On a loaded 2-core machine it is ~0.3-1.5 ms, far above the 20 us latency.

Then every repeat interleaves:

1. Calibration: every rank runs each op alone (a one-rank group: no communication, the P = 1 path) on its own
   copy of a sequence of ``--local-len`` / 2 and 2 x ``--local-len`` tokens, all ranks at once, so the
   compute is timed under the same CPU sharing and background load as the SP step. Forward and backward are
   each fitted to ``a S + c`` over the two lengths (the chunked kernel is linear in S; ``c`` is the per-call
   overhead), which gives the compute of ``--local-len`` tokens without having measured it.
2. Measurement: the SP step, weak scaling (``--local-len`` tokens per rank), with link emulation on
   (``--gbps``, 20 us latency; arrival semantics, ``seqpar.collectives.comm.emulation``) and off.
   Every time is the slowest rank's; medians of the repeats; the spread (min-max) shows the noise.
3. Prediction: the registry entry's ``layer_time`` (``seqpar.strategies``: what ``CostModel.seq_time`` charges
   per layer) with the fitted compute and the emulated link plus the measured host time: LASP-2's all-gather,
   ZeCO's (P - 1 + K - 1)-hop pipelined scan with K from the op's rule on this link, each overlapped with the
   intra-chunk work.
   ``schedule on link-off`` applies the same formula to the SP step measured with the link off (the
   schedule alone, without the calibration's fit). ``scan after compute`` charges a ZeCO whose scan started
   only after the whole local compute (compute + scan each way).

The calibration lives here (``CostModel.calibrate`` is the planner's, fitted to whole-model profiles); the
machine is shared with other work, so the load average is recorded. Prints a table and writes
bench/results/linear_predicted.json; target |predicted / measured - 1| <= 20%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_ranks, save_results  # noqa: E402

from seqpar import strategies  # noqa: E402
from seqpar.collectives import comm, scan  # noqa: E402
from seqpar.collectives.lasp2 import lasp2_linear_attention  # noqa: E402
from seqpar.collectives.zeco import zeco_linear_attention  # noqa: E402

HEADS, DK = 8, 64
LATENCY_S = 20e-6
OPS = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}


def _inputs(seq_len: int, rank: int, world: int):
    """This rank's contiguous shard of q, k, v, a per-token decay and the output gradient."""
    gen = torch.Generator().manual_seed(seq_len)
    s_local = seq_len // world
    sl = slice(rank * s_local, (rank + 1) * s_local)
    q, k, v, do = (torch.randn(1, seq_len, HEADS, DK, generator=gen)[:, sl] * 0.3 for _ in range(4))
    g = (-0.1 * torch.rand(1, seq_len, HEADS, generator=gen))[:, sl]
    return q, k, v, g, do


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure(s_local: int, calib_lens: list[int], repeats: int, gbps: float) -> dict:
    """Per op: the SP step with the link on and off, and the op alone at each calibration length (forward and
    forward + backward), all interleaved in every repeat; the slowest rank's times."""
    rank, world = dist.get_rank(), dist.get_world_size()
    alone_group = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group, in order
    links = {"link": comm.LinkEmulation(gbps=gbps, latency_s=LATENCY_S), "off": None}
    comm.set_link_emulation(links["link"])
    host_s = scan.measure_message_host_s()  # the same on every rank
    scan.set_message_host_s(host_s)  # ZeCO's piece rule charges it, as the cost model below does
    comm.set_link_emulation(None)
    sp_inputs = _inputs(s_local * world, rank, world)
    alone_inputs = {n: _inputs(n, 0, 1) for n in calib_lens}

    def step(op, inputs, group):
        q, k, v, g, do = inputs
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g)]
        start = time.perf_counter()
        o = op(*leaves[:3], log_decay=leaves[3], group=group)
        forward = time.perf_counter() - start
        o.backward(do)
        return forward, time.perf_counter() - start

    runs = [("sp", name, link) for link in links for name in OPS]
    runs += [("alone", name, n) for n in calib_lens for name in OPS]
    times = {run: {"fwd": [], "step": []} for run in runs}
    try:
        for name, op in OPS.items():  # warm-up
            step(op, sp_inputs, None)
            step(op, alone_inputs[calib_lens[0]], alone_group)
        for _ in range(repeats):
            for run in runs:
                kind, name, which = run
                comm.set_link_emulation(links[which] if kind == "sp" else None)
                dist.barrier()
                forward, total = step(OPS[name], sp_inputs if kind == "sp" else alone_inputs[which],
                                      None if kind == "sp" else alone_group)
                times[run]["fwd"].append(_slowest(forward))
                times[run]["step"].append(_slowest(total))
    finally:
        comm.set_link_emulation(None)
        scan.set_message_host_s(None)
    return {"host_s_per_message": host_s} | {f"{kind}:{name}:{which}": {"fwd_median_s": statistics.median(t["fwd"]),
                                       "median_s": statistics.median(t["step"]),
                                       "min_s": min(t["step"]), "max_s": max(t["step"])}
            for (kind, name, which), t in times.items()}


def fitted_compute(measured: dict, name: str, calib_lens: list[int], s_local: int) -> tuple[float, float]:
    """(forward, backward) seconds of ``s_local`` tokens alone, from ``a S + c`` fitted to the calibration."""
    fwd = [measured[f"alone:{name}:{n}"]["fwd_median_s"] for n in calib_lens]
    step = [measured[f"alone:{name}:{n}"]["median_s"] for n in calib_lens]
    bwd = [s - f for s, f in zip(step, fwd)]
    fit = [float(np.polyval(np.polyfit(calib_lens, ys, 1), s_local)) for ys in (fwd, bwd)]
    return fit[0], fit[1]


def layer_shape(s_local: int, world: int) -> strategies.LayerShape:
    return strategies.LayerShape(seq_len=s_local * world, degree=world, heads=HEADS, kv_heads=HEADS, head_dim=DK,
                                 elem_bytes=4, state_bytes=HEADS * DK * DK * strategies.ACCUM_BYTES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens per rank, 3 repeats (~1.5 min)")
    parser.add_argument("--local-len", type=int, default=None, help="tokens per rank (default 1024, quick 512)")
    parser.add_argument("--gbps", type=float, default=0.02, help="emulated link, Gbit/s per direction")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (quick 3)")
    args = parser.parse_args()
    s_local = args.local_len or (512 if args.quick else 1024)
    repeats = args.repeats or (3 if args.quick else 5)
    calib_lens = [s_local // 2, 2 * s_local]
    load_before = os.getloadavg()
    rows, raw = [], {}
    for world in args.worlds:
        measured = run_ranks(measure, world, s_local, calib_lens, repeats, args.gbps)[0]
        raw[world] = measured
        host_s = measured["host_s_per_message"]
        link = strategies.Link(args.gbps * 1e9 / 8, LATENCY_S, host_s=host_s)
        shape = layer_shape(s_local, world)
        for name in OPS:
            m = measured[f"sp:{name}:link"]
            off = measured[f"sp:{name}:off"]
            fwd, bwd = fitted_compute(measured, name, calib_lens, s_local)
            entry = strategies.get(name)
            predicted = float(entry.layer_time(shape, fwd, bwd, link))
            off_fwd = off["fwd_median_s"]
            schedule = float(entry.layer_time(shape, off_fwd, off["median_s"] - off_fwd, link))
            row = {"op": name, "P": world, "S": s_local * world, "measured ms": 1e3 * m["median_s"],
                   "spread ms": f"{1e3 * m['min_s']:.0f}-{1e3 * m['max_s']:.0f}",
                   "host us/msg": 1e6 * host_s, "fitted compute ms": 1e3 * (fwd + bwd), "predicted ms": 1e3 * predicted,
                   "predicted/measured": predicted / m["median_s"], "link off ms": 1e3 * off["median_s"],
                   "schedule on link-off ms": 1e3 * schedule, "schedule/measured": schedule / m["median_s"]}
            if name == "zeco":
                scan = float(strategies.zeco_scan_time(shape, link))
                after = fwd + bwd + 2 * scan
                row["K"] = strategies.zeco_pieces(shape, link)
                row["scan after compute ms"] = 1e3 * after
                row["scan after/measured"] = after / m["median_s"]
            rows.append(row)
        print(f"P={world} done", flush=True)
    load_after = os.getloadavg()
    print(f"\npredicted vs measured, fwd+bwd, {s_local} tokens per rank, H={HEADS}, D={DK}, per-token decay, "
          f"emulated {args.gbps} Gbit/s + {LATENCY_S * 1e6:.0f} us links; compute fitted at {calib_lens} tokens")
    print_table(rows, list(rows[-1]))
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    path = save_results("linear_predicted", {
        "config": {"local_len": s_local, "heads": HEADS, "dk": DK, "dv": DK, "decay": "per-token (B, S, H)",
                   "gbps": args.gbps, "latency_s": LATENCY_S, "repeats": repeats, "calibration_lens": calib_lens,
                   "cores": os.cpu_count()},
        "load_average_before": load_before, "load_average_after": load_after,
        "note": ("a shared 2-core machine loaded by other work (see the load averages; the lead re-runs it on a "
                 "quiet machine); every time is interleaved with the others" if max(load_before[0], load_after[0])
                 > 2.5 else "a quiet machine (load average <= 2.5); every time is interleaved with the others"),
        "rows": rows, "raw": raw,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
