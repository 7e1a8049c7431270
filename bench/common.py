"""What the benchmark scripts share: running a function on P gloo ranks, medians, tables, JSON results.

Benchmarks report ratios measured side by side in one run and medians of repeats: these machines are shared
and noisy, so a single absolute time means little.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        out_queue.put((rank, fn(*args)))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh gloo ranks (one thread each); results in rank order."""
    ctx = mp.get_context("spawn")
    out_queue = ctx.Queue()
    port = _free_port()
    workers = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, out_queue)) for r in range(world_size)]
    for w in workers:
        w.start()
    results = dict(out_queue.get(timeout=1800) for _ in workers)
    for w in workers:
        w.join()
    return [results[r] for r in range(world_size)]


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
