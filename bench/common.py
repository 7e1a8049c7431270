"""What the benchmark scripts share: running a function on P gloo ranks, medians, tables, JSON results.

Benchmarks report ratios measured side by side in one run and medians of repeats: these machines are shared
and noisy, so a single absolute time means little.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from seqpar.launch.ranks import run_ranks

__all__ = ["RESULTS", "median_time", "print_table", "run_ranks", "save_results"]

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs; with ``sync`` every run starts after a barrier and the
    time is the slowest rank's (what a step costs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start])
        if sync:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) + " |")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def save_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "date": datetime.date.today().isoformat(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
