"""Soak: many training steps on CPU gloo, watching for leaks.

    python bench/soak.py [--steps 500] [--world-size 2] [--strategy ring]

Every rank trains a tiny Llama through ``seqpar.parallelize`` on long-tail synthetic batches and samples its
resident memory (RSS) every 100 steps, and counts process groups, threads and open file descriptors before
the first and after the last step. Goal: RSS flat after warm-up (growth per 100 steps ~0) and equal counts.
Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_ranks, save_results  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _counts() -> dict:
    from torch.distributed import distributed_c10d

    return {
        "process_groups": len(distributed_c10d._world.pg_map),
        "threads": len(os.listdir("/proc/self/task")),
        "python_threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def soak(steps: int, strategy: str) -> dict:
    import seqpar
    from seqpar.launch.data import make_source
    from seqpar.launch.train import build_model

    model = build_model("llama-tiny", seed=0)
    sp_model = seqpar.parallelize(model, strategy=strategy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    source = make_source("longtail", vocab=model.config.vocab_size, tokens_per_step=1024, max_len=512, seed=0)

    def step() -> float:
        local = sp_model.prepare(source.next_batch())
        out = sp_model(**local)
        out.loss.backward()
        sp_model.sync_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    step()  # warm-up: allocator pools, lazy imports, process groups
    before = _counts()
    rss = [(0, _rss_mib())]
    losses = []
    for i in range(1, steps + 1):
        losses.append(step())
        if i % 100 == 0:
            rss.append((i, _rss_mib()))
    after = _counts()
    dist.barrier()
    return {"rss_mib": rss, "before": before, "after": after, "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--strategy", default="ring")
    args = parser.parse_args()
    results = run_ranks(soak, args.world_size, args.steps, args.strategy)
    rows = []
    for rank, res in enumerate(results):
        rss = res["rss_mib"]
        growth = [(b[1] - a[1]) for a, b in zip(rss[1:], rss[2:])]  # per 100 steps, after the first 100
        rows.append({
            "rank": rank, "rss_start_mib": rss[0][1], "rss_end_mib": rss[-1][1],
            "max_growth_per_100_mib": max(growth) if growth else 0.0,
            "pgs": f"{res['before']['process_groups']}->{res['after']['process_groups']}",
            "threads": f"{res['before']['threads']}->{res['after']['threads']}",
            "fds": f"{res['before']['fds']}->{res['after']['fds']}",
            "loss": f"{res['first_loss']:.3f}->{res['last_loss']:.3f}",
        })
    print(f"\nsoak: {args.steps} steps, {args.world_size} gloo ranks, strategy {args.strategy}")
    print_table(rows, list(rows[0]))
    leaks = [r["rank"] for r, res in zip(rows, results) if res["before"] != res["after"]]
    print("no process group, thread or fd leak" if not leaks else f"COUNTS CHANGED on ranks {leaks}")
    path = save_results("soak", {"config": vars(args), "ranks": results, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
