"""Delta-rule SP on CPU gloo: lasp2_delta_rule vs zeco_delta_rule vs one device, forward+backward time and bytes.

    python bench/delta_rule_sp.py [--quick]

One Gated DeltaNet layer (per-head, per-token decay; l2-normalised keys) of S tokens, B = 1, H heads,
Dk = Dv = D. For P in {2, 4, 8} each op runs forward+backward on P ranks (one thread each) over emulated links
(``comm.set_link_emulation``: 1 Gbit/s, 20 us latency; ZeCO's relay charged hop by hop); the "one device" row is
the same layer on one rank over the whole sequence (the chunked kernel, no communication). The table reports
medians of interleaved repeats (slowest rank per repeat), ratios to one device measured in the same run, and the
bytes the busiest rank sent (forward + backward, ``count_comm``) next to the documented formulas.

On this 2-core machine, shared with other work while this ran, P ranks share 2 cores: the ratios say how the two
ops compare with each other and what the communication adds, not the speedup a P-GPU run gets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_ranks, save_results  # noqa: E402

from seqpar.collectives import comm  # noqa: E402
from seqpar.collectives.delta_rule import lasp2_delta_rule, zeco_delta_rule  # noqa: E402
from seqpar.kernels.delta_rule import chunk_gated_delta_rule  # noqa: E402

HEADS, D = 4, 64
LINK_GBPS, LATENCY_S = 1.0, 20e-6
OPS = {"lasp2": lasp2_delta_rule, "zeco": zeco_delta_rule}


def problem(seq_len: int, sl: slice) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(1, seq_len, HEADS, D, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, seq_len, HEADS, D, generator=gen), dim=-1)
    v, dout = (torch.randn(1, seq_len, HEADS, D, generator=gen) for _ in range(2))
    beta = torch.sigmoid(torch.randn(1, seq_len, HEADS, generator=gen))
    g = -0.1 * torch.rand(1, seq_len, HEADS, generator=gen)
    return [t[:, sl] for t in (q, k, v, beta, g, dout)]


def measure(seq_len: int, repeats: int) -> dict:
    p, rank = dist.get_world_size(), dist.get_rank()
    s_local = seq_len // p
    q, k, v, beta, g, dout = problem(seq_len, slice(rank * s_local, (rank + 1) * s_local))
    comm.set_link_emulation(comm.LinkEmulation(gbps=LINK_GBPS, latency_s=LATENCY_S) if p > 1 else None)
    names = list(OPS) if p > 1 else ["one_device"]
    steps, row = {}, {}
    for name in names:
        def step(name=name):
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, beta, g)]
            if name == "one_device":
                o, _ = chunk_gated_delta_rule(*leaves[:4], log_decay=leaves[4])
            else:
                o = OPS[name](*leaves[:4], log_decay=leaves[4])
            o.backward(dout)

        steps[name] = step
        with comm.count_comm() as stats:  # the warm-up run
            step()
        row[name] = {"bytes": stats.bytes_sent}
    times = {name: [] for name in names}
    for _ in range(repeats):  # interleaved: both ops see the same background load
        for name in names:
            dist.barrier()
            start = time.perf_counter()
            steps[name]()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(elapsed.item())
    for name in names:
        row[name]["time_s"] = statistics.median(times[name])
    comm.set_link_emulation(None)
    return row


def formula_bytes(name: str, p: int) -> int:
    """The busiest rank's forward + backward bytes by the module docstring's formulas (float32, B = 1)."""
    n = HEADS * D * D * 4
    if name == "lasp2":
        return (p - 1) * (n + n) + (p - 1) * n  # forward (A_r, B_r), backward L_r
    return 2 * n if p > 2 else n  # zeco: one state each way (ranks 1..P-2 send both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short sequence, fewer repeats (smoke run)")
    args = parser.parse_args()
    seq_len = 1024 if args.quick else 4096
    repeats = 3 if args.quick else 5
    load_before = os.getloadavg()[0]
    one = run_ranks(measure, 1, seq_len, repeats)[0]["one_device"]["time_s"]
    rows = [{"P": 1, "op": "one device", "ms": 1e3 * one, "time/one device": 1.0, "KB busiest": 0.0,
             "KB formula": 0.0}]
    for p in (2, 4, 8):
        per_rank = run_ranks(measure, p, seq_len, repeats)
        for name in OPS:
            sent = max(r[name]["bytes"] for r in per_rank)
            assert sent == formula_bytes(name, p), (name, p, sent)
            t = per_rank[0][name]["time_s"]
            rows.append({"P": p, "op": name, "ms": 1e3 * t, "time/one device": t / one, "KB busiest": sent / 1e3,
                         "KB formula": formula_bytes(name, p) / 1e3})
        print(f"P={p} done", flush=True)
    print(f"\nS = {seq_len}, H = {HEADS}, Dk = Dv = {D}, float32; emulated {LINK_GBPS} Gbit/s links, "
          f"{LATENCY_S * 1e6:.0f} us latency; forward+backward, median of {repeats} (slowest rank)")
    print_table(rows, ["P", "op", "ms", "time/one device", "KB busiest", "KB formula"])
    path = save_results("delta_rule_sp", {
        "config": {"seq_len": seq_len, "batch": 1, "heads": HEADS, "dk": D, "dv": D, "decay": "per head and token",
                   "dtype": "float32", "repeats": repeats, "threads_per_rank": 1, "chunk_size": 64,
                   "link_gbps": LINK_GBPS, "latency_s": LATENCY_S, "bytes": "busiest rank, forward + backward",
                   "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                   "notes": "2-core CPU machine shared with other helpers' work while this ran (loaded: the 1-minute "
                            "load average before and after is load_average_1min); P ranks share 2 cores, so times at "
                            "P > 2 include oversubscription. The ops overlap their transfer with the intra-chunk "
                            "output pass (state pass first, transfer issued, output pass, read-out)"},
        "rows": rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
