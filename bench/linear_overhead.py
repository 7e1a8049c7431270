"""LASP-2 and ZeCO at P = 1 against the plain chunked kernel: what the SP ops cost beyond the local compute.

    python bench/linear_overhead.py [--quick]

At P = 1 nothing travels, so the ratio (SP op forward+backward) / (``linear_attention_chunk`` forward+backward)
is the ops' own overhead: their state pass / output pass split, the kept autograd graphs, the inter term. Per
configuration the three run interleaved within each repeat (so load drifts hit all three alike) and the table
reports the medians of >= 5 repeats and their ratios. Two variants:

* ``init=False``: no initial state. Rank 0 of any P is in this case: its incoming state is zero, and the ops
  skip the inter term and its backward.
* ``init=True``: an initial state. Rank 0 folds it into its state pass (as the kernel does), so this costs
  the same as ``init=False``.

Ranks r > 0 of a P > 1 run also compute the inter term, scale * exp(b_t) q_t^T S_in, and its backward (S_in
arrives after their output pass, which is the point of the overlap). Column ``inter/kernel`` times that term's
forward+backward alone (``linear_attention_inter``) against the kernel: what those ranks add on top.

Per-token decay (B, S, H), B = 1, H = 4, Dk = Dv = 64, chunk 64, float32, torch backend, one thread per
process as the 2-core CI machine allows. Writes bench/results/linear_overhead.json. Target (issue 17): <= 1.2.
The machine is shared with other jobs: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import print_table, run_ranks, save_results  # noqa: E402

from seqpar.collectives.lasp2 import lasp2_linear_attention  # noqa: E402
from seqpar.collectives.zeco import zeco_linear_attention  # noqa: E402
from seqpar.kernels.linear import linear_attention_chunk, linear_attention_inter  # noqa: E402

H, D = 4, 64


def measure(lengths: list[int], repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for s in lengths:
        for with_init in (False, True):
            gen = torch.Generator().manual_seed(s)
            q, k, v = (torch.randn(1, s, H, D, generator=gen).requires_grad_(True) for _ in range(3))
            g = (-0.1 * torch.rand(1, s, H, generator=gen)).requires_grad_(True)
            init = torch.randn(1, H, D, D, generator=gen).requires_grad_(True) if with_init else None
            ops = {
                "kernel": lambda: linear_attention_chunk(q, k, v, log_decay=g, initial_state=init,
                                                         backend="torch")[0],
                "lasp2": lambda: lasp2_linear_attention(q, k, v, log_decay=g, initial_state=init, backend="torch"),
                "zeco": lambda: zeco_linear_attention(q, k, v, log_decay=g, initial_state=init, backend="torch"),
                "inter": lambda: linear_attention_inter(q, s_in, log_decay=g),
            }
            s_in = torch.randn(1, H, D, D, generator=gen)
            outs = {}
            times = {name: [] for name in ops}
            for rep in range(repeats + 1):  # the first round warms up
                for name, fn in ops.items():
                    for t in (q, k, v, g, init):
                        if t is not None:
                            t.grad = None
                    start = time.perf_counter()
                    o = fn()
                    o.square().sum().backward()
                    elapsed = time.perf_counter() - start
                    if rep:
                        times[name].append(elapsed)
                    outs[name] = (o.detach(), q.grad.clone())
            del outs["inter"]
            err = max(float((outs[n][i] - outs["kernel"][i]).norm() / outs["kernel"][i].norm())
                      for n in ("lasp2", "zeco") for i in (0, 1))
            med = {n: statistics.median(t) for n, t in times.items()}
            rows.append({"S": s, "init": with_init, "kernel_ms": 1e3 * med["kernel"],
                         "lasp2/kernel": med["lasp2"] / med["kernel"], "zeco/kernel": med["zeco"] / med["kernel"],
                         "inter/kernel": med["inter"] / med["kernel"],
                         "max_rel_err": err, "repeats": repeats,
                         "spread_kernel": (min(times["kernel"]) * 1e3, max(times["kernel"]) * 1e3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="S = 1024 only, 3 repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    lengths, repeats = ([1024], 3) if args.quick else ([4096, 8192], max(5, args.repeats))
    load_before = os.getloadavg()
    rows = run_ranks(measure, 1, lengths, repeats)[0]
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    assert max(r["max_rel_err"] for r in rows) < 1e-4, "the SP ops disagree with the kernel"
    print_table(rows, ["S", "init", "kernel_ms", "lasp2/kernel", "zeco/kernel", "inter/kernel", "max_rel_err",
                       "repeats"])
    if not args.quick:
        path = save_results("linear_overhead", {"P": 1, "heads": H, "dim": D, "decay": "per token",
                                                "dtype": "float32", "chunk_size": 64,
                                                "load_average_before": load_before, "load_average_after": load_after,
                                                "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
