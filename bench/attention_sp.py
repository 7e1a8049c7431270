"""Softmax-attention SP ops on CPU gloo: forward+backward time against the single-device kernel, bytes per rank.

    python bench/attention_sp.py [--quick] [--link-only]

For P in {2, 4} and several sequence lengths, every op runs on P ranks (one thread each) and the single-device
kernel runs on the whole sequence in the same process group run; the table reports medians of repeats as
ratios (op step time / single-device time) and the bytes each rank sent. A second table repeats the longest
length on emulated links of several bandwidths (seqpar.collectives.comm.set_link_emulation), where overlap,
volume and bidirectional transfers decide which strategy is fastest (arrival semantics: a ring's blocks are
charged hop by hop); ``--link-only`` re-measures just that table and keeps the recorded link-off rows.
Writes bench/results/attention_sp.json.

On this 2-core machine P ranks share 2 cores, so P=4 runs compute at most 2x in parallel: the ratios show
the cost of each algorithm relative to the others, not the speedup a P-GPU run gets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median_time, print_table, run_ranks, save_results  # noqa: E402

import seqpar.collectives as collectives  # noqa: E402
from seqpar.collectives import comm  # noqa: E402
from seqpar.collectives.layout import shard_sequence  # noqa: E402
from seqpar.kernels.attention import attention  # noqa: E402

OPS = ["ring_attention", "token_ring_attention", "ulysses_attention", "allgather_kv_attention"]
HEADS, HEAD_DIM = 8, 64


def measure(seq_len: int, repeats: int, link_gbps: float | None) -> dict:
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, seq_len, HEADS, HEAD_DIM, generator=gen) for _ in range(4))
    result: dict = {}
    if link_gbps is None:  # the single-device baseline: rank 0 alone, the others wait
        def single():
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            attention(*leaves, causal=True).backward(dout)

        result["single_s"] = median_time(single, repeats=repeats) if rank == 0 else None
        dist.barrier()
    comm.set_link_emulation(None if link_gbps is None else comm.LinkEmulation(gbps=link_gbps, latency_s=20e-6))
    local = [shard_sequence(t) for t in (q, k, v, dout)]
    for name in OPS:
        op = getattr(collectives, name, None)
        if op is None:
            continue

        def step():
            leaves = [t.clone().requires_grad_(True) for t in local[:3]]
            op(*leaves, causal=True).backward(local[3])

        with comm.count_comm() as stats:
            step()
        result[name] = {"time_s": median_time(step, repeats=repeats, sync=True), "bytes": stats.bytes_sent}
    comm.set_link_emulation(None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one length, fewer repeats (smoke run)")
    parser.add_argument("--link-only", action="store_true",
                        help="re-measure only the emulated-link table and keep the recorded link-off rows")
    args = parser.parse_args()
    lengths = [1024] if args.quick else [1024, 2048, 4096]
    repeats = 2 if args.quick else 3
    link_bandwidths = [0.25, 1.0, 4.0]  # Gbit/s: slower than, about as fast as, and faster than the compute
    rows, link_rows = [], []
    for p in (2, 4):
        for seq_len in [] if args.link_only else lengths:
            res = run_ranks(measure, p, seq_len, repeats, None)[0]
            row = {"P": p, "S": seq_len, "single_s": res["single_s"]}
            for name in OPS:
                if name in res:
                    row[f"{name}/single"] = res[name]["time_s"] / res["single_s"]
                    row[f"{name} MB"] = res[name]["bytes"] / 1e6
            rows.append(row)
            print(f"P={p} S={seq_len} done", flush=True)
        for link_gbps in link_bandwidths:
            res = run_ranks(measure, p, lengths[-1], repeats, link_gbps)[0]
            ring_time = res["ring_attention"]["time_s"]
            ratios = {n: res[n]["time_s"] / ring_time for n in OPS if n in res}
            link_rows.append({"P": p, "S": lengths[-1], "link_gbps": link_gbps,
                              **{f"{n}/ring": r for n, r in ratios.items()},
                              "fastest": min(ratios, key=ratios.get).replace("_attention", "")})
    if args.link_only:  # the link-off rows do not depend on the emulation: keep the recorded ones
        rows = json.loads((RESULTS / "attention_sp.json").read_text())["rows"]
    present = [n for n in OPS if f"{n}/single" in rows[0]]
    print("\nforward+backward step time / single-device time (median of repeats), MB sent per rank")
    print_table(rows, ["P", "S"] + [c for n in present for c in (f"{n}/single", f"{n} MB")])
    print("\nemulated links: step time / ring attention step time, and the fastest strategy per bandwidth")
    print_table(link_rows, ["P", "S", "link_gbps"] + [f"{n}/ring" for n in present] + ["fastest"])
    path = save_results("attention_sp", {
        "config": {"heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32", "causal": True, "layout": "zigzag",
                   "repeats": repeats, "threads_per_rank": 1,
                   **({"link_off_rows": "kept from the recorded run (--link-only)"} if args.link_only else {})},
        "rows": rows, "link_emulated": link_rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
