"""The cost model's LASP-2 / ZeCO step time against the measured one, on emulated links, P = 2, 4, 8.

    python bench/linear_predicted.py [--quick]        # ~3 min (--quick ~1.5 min) on a quiet 2-core machine

1. Calibrate: at P = 1 (one rank, no communication) time each op's forward + backward for three local
   lengths and fit ``CostModel.calibrate`` to them (one model per op: the attention efficiency and the fixed
   per-call overhead; the bandwidth and latency coefficients stay 1, the link is the emulated one).
2. Measure: weak scaling, ``--local-len`` tokens per rank, on P gloo ranks (one thread each): the slowest
   rank's step time with link emulation on (``--gbps``, 20 us latency; arrival semantics,
   ``seqpar.collectives.comm.emulation``) and off, medians of repeats that interleave every (op, link), so
   the background load of a shared machine hits all alike; the spread (min-max) shows the noise.
3. Predict: ``CostModel.seq_time(P * local_len, P, op)`` with a ``Cluster`` describing this machine: the
   calibrated per-rank speed shared by P ranks on ``os.cpu_count()`` cores (``peak * min(1, cores / P)``),
   links of the emulated bandwidth and latency. The strategies' ``layer_time`` charges the schedules in
   ``seqpar/strategies.py``: LASP-2's all-gather and ZeCO's pipelined K-piece scan overlapped with the
   intra-chunk work. ``schedule on link-off`` applies the same ``layer_time`` to the compute measured at P
   with the link off (the schedule's prediction without the CPU-sharing model: on a loaded machine the
   P = 1 calibration says little about P ranks' speed). ``scan after compute`` charges a ZeCO whose scan
   starts only after the whole local compute (``compute + scan`` each way: the op before the overlapped one).

Prints a table and writes bench/results/linear_predicted.json; target |predicted / measured - 1| <= 20%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_ranks, save_results  # noqa: E402

from seqpar import strategies  # noqa: E402
from seqpar.collectives import comm  # noqa: E402
from seqpar.collectives.lasp2 import lasp2_linear_attention  # noqa: E402
from seqpar.collectives.zeco import zeco_linear_attention  # noqa: E402
from seqpar.solver.cost_model import LINEAR_BWD_OVER_FWD, Cluster, CostCoefficients, CostModel, ModelSpec  # noqa: E402

HEADS, DK = 8, 64
LATENCY_S = 20e-6
NOMINAL_TFLOPS = 0.05  # a starting point only: calibration fits the efficiency that makes it this CPU's speed
OPS = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}


def _inputs(seq_len: int, rank: int, world: int):
    """This rank's contiguous shard of q, k, v, a per-token decay and the output gradient."""
    gen = torch.Generator().manual_seed(seq_len)
    s_local = seq_len // world
    sl = slice(rank * s_local, (rank + 1) * s_local)
    q, k, v, do = (torch.randn(1, seq_len, HEADS, DK, generator=gen)[:, sl] * 0.3 for _ in range(4))
    g = (-0.1 * torch.rand(1, seq_len, HEADS, generator=gen))[:, sl]
    return q, k, v, g, do


def measure(local_lens: list[int], repeats: int, gbps: float | None) -> dict:
    """Median step time (slowest rank) of each op per local length, on the emulated link (``gbps``; None:
    only with emulation off) and with emulation off; every repeat runs each (op, link) once, interleaved, so
    that background load on a shared machine hits all of them alike."""
    rank, world = dist.get_rank(), dist.get_world_size()
    links = {"link": None if gbps is None else comm.LinkEmulation(gbps=gbps, latency_s=LATENCY_S), "off": None}
    if gbps is None:
        del links["link"]
    try:
        out = {}
        for s_local in local_lens:
            q, k, v, g, do = _inputs(s_local * world, rank, world)

            def step(op):
                leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g)]
                op(*leaves[:3], log_decay=leaves[3]).backward(do)

            runs = [(name, link) for link in links for name in OPS]
            times = {run: [] for run in runs}
            for name, op in OPS.items():  # warm-up
                step(op)
            for _ in range(repeats):
                for name, link in runs:
                    comm.set_link_emulation(links[link])
                    dist.barrier()
                    start = time.perf_counter()
                    step(OPS[name])
                    elapsed = torch.tensor([time.perf_counter() - start])
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    times[(name, link)].append(elapsed.item())
            out[s_local] = {link: {name: {"median_s": statistics.median(times[(name, link)]),
                                          "min_s": min(times[(name, link)]), "max_s": max(times[(name, link)])}
                                   for name in OPS} for link in links}
        return out
    finally:
        comm.set_link_emulation(None)


def cost_models(calibration: dict, gbps: float) -> dict[str, CostModel]:
    """One calibrated model per op: a one-layer linear-attention model (the dense part is negligible)."""
    spec = ModelSpec(num_layers=1, hidden=1, num_heads=HEADS, num_kv_heads=HEADS, head_dim=DK, ffn_hidden=1,
                     vocab=1, layer_kinds=("linear",), bytes_per_param=4, linear_chunk=strategies.LINEAR_CHUNK)
    link_gbytes = gbps / 8
    cluster = Cluster(world_size=8, gpus_per_node=8, peak_tflops=NOMINAL_TFLOPS, mem_bytes=1e10,
                      intra_node_gbps=link_gbytes, inter_node_gbps=link_gbytes, latency_s=LATENCY_S)
    base = CostModel(cluster, spec, CostCoefficients(bandwidth_efficiency=1.0, latency_scale=1.0))
    models = {}
    for name in OPS:
        points = [(s, r["off"][name]["median_s"]) for s, r in calibration.items()]
        try:
            models[name] = base.calibrate([(s, 1, name, t) for s, t in points])
        except ValueError as err:  # calibrate's Levenberg-Marquardt can step to an efficiency of 0 on noisy data
            print(f"CostModel.calibrate failed for {name} ({err}); fitting time = a S + c by least squares instead")
            models[name] = _linear_fit(base, name, points)
    return models


def _linear_fit(base: CostModel, name: str, points: list[tuple[int, float]]) -> CostModel:
    """The coefficients of ``time = a S + c`` fitted to ``points``: attention efficiency from a, overhead c."""
    lengths = np.array([s for s, _ in points], dtype=float)
    slope, intercept = np.polyfit(lengths, [t for _, t in points], 1)
    model_slope = base.seq_time(2.0, 1, name) - base.seq_time(1.0, 1, name)  # seconds per token at the default
    scale = model_slope / max(slope, 1e-12)
    coefficients = replace(base.coefficients, attention_efficiency=base.coefficients.attention_efficiency * scale,
                           dense_efficiency=base.coefficients.dense_efficiency * scale,
                           sequence_overhead_s=max(float(intercept), 0.0))
    return replace(base, coefficients=coefficients)


def _shared(model: CostModel, world: int, cores: int) -> CostModel:
    """The model for ``world`` ranks sharing ``cores`` cores: each gets ``min(1, cores / world)`` of one."""
    share = min(1.0, cores / world)
    return replace(model, cluster=replace(model.cluster, peak_tflops=model.cluster.peak_tflops * share))


def predict(model: CostModel, name: str, s_local: int, world: int, cores: int) -> float:
    """The model's step time at ``world`` ranks sharing ``cores`` cores."""
    return _shared(model, world, cores).seq_time(s_local * world, world, name)


def scan_after_compute(model: CostModel, s_local: int, world: int, cores: int) -> float:
    """ZeCO if its scan started only after the whole local compute: compute + scan, each way."""
    m, S = _shared(model, world, cores), s_local * world
    fwd, bwd = (float(t[0]) for t in m._attention_compute(m._lengths([S]), world, "linear"))
    scan = strategies.zeco_scan_time(m._layer_shape(S, world), m._link(world))
    return m.seq_time(S, world, "zeco") - float(m.layer_times([S], world, "zeco")[0]) + fwd + bwd + 2 * scan


def schedule_only(model: CostModel, name: str, s_local: int, world: int, compute_s: float) -> float:
    """The strategy's ``layer_time`` around the compute measured at P with emulation off (split forward /
    backward as the cost model does): the schedule's prediction alone, free of the CPU-sharing model."""
    S = s_local * world
    fwd = compute_s / (1 + LINEAR_BWD_OVER_FWD)
    return float(strategies.get(name).layer_time(model._layer_shape(S, world), fwd, compute_s - fwd,
                                                 model._link(world)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens per rank, 3 repeats (~1.5 min)")
    parser.add_argument("--local-len", type=int, default=None, help="tokens per rank (default 1024, quick 512)")
    parser.add_argument("--gbps", type=float, default=0.1, help="emulated link, Gbit/s per direction")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    s_local = args.local_len or (512 if args.quick else 1024)
    repeats = 3 if args.quick else 5
    cores = os.cpu_count() or 1

    calib_lens = [s_local // 2, s_local, 2 * s_local]
    calibration = run_ranks(measure, 1, calib_lens, repeats + 2, None)[0]
    models = cost_models(calibration, args.gbps)
    rows, raw = [], {"calibration": calibration, "measured": {}}
    for world in args.worlds:
        measured = run_ranks(measure, world, [s_local], repeats, args.gbps)[0][s_local]
        raw["measured"][world] = measured
        for name in OPS:
            m, off = measured["link"][name], measured["off"][name]["median_s"]
            predicted = predict(models[name], name, s_local, world, cores)
            schedule = schedule_only(models[name], name, s_local, world, off)
            row = {"op": name, "P": world, "S": s_local * world, "measured ms": 1e3 * m["median_s"],
                   "spread ms": f"{1e3 * m['min_s']:.0f}-{1e3 * m['max_s']:.0f}",
                   "predicted ms": 1e3 * predicted, "predicted/measured": predicted / m["median_s"],
                   "link off ms": 1e3 * off, "schedule on link-off ms": 1e3 * schedule,
                   "schedule/measured": schedule / m["median_s"]}
            if name == "zeco":
                after = scan_after_compute(models[name], s_local, world, cores)
                row["scan after compute ms"] = 1e3 * after
                row["scan after/measured"] = after / m["median_s"]
            rows.append(row)
        print(f"P={world} done", flush=True)
    print(f"\npredicted vs measured, fwd+bwd, {s_local} tokens per rank, H={HEADS}, D={DK}, per-token decay, "
          f"emulated {args.gbps} Gbit/s + {LATENCY_S * 1e6:.0f} us links, {cores} cores")
    print_table(rows, list(rows[-1]))
    coefficients = {name: vars(model.coefficients) for name, model in models.items()}
    path = save_results("linear_predicted", {
        "config": {"local_len": s_local, "heads": HEADS, "dk": DK, "dv": DK, "decay": "per-token (B, S, H)",
                   "gbps": args.gbps, "latency_s": LATENCY_S, "repeats": repeats, "cores": cores,
                   "zeco_pieces": min(strategies.ZECO_PIECES, DK), "nominal_tflops": NOMINAL_TFLOPS},
        "coefficients": coefficients, "rows": rows, "raw": raw,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
