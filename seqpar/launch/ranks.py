"""Local gloo ranks in separate processes, for the test suite and the benchmarks (one spawner for both).

    results = run_distributed(fn, world_size, *args, **kwargs)   # pooled: ranks started once per world size
    results = run_ranks(fn, world_size, *args)                   # a fresh set of ranks for one call

``fn`` must be importable by the workers (a module-level function of a test module, a benchmark script or
seqpar); it runs on every rank with the default process group initialised (gloo, CPU, one thread per rank:
8 ranks share a few cores, more threads only thrash). An exception on any rank fails the call with that rank's
traceback. A rank that does not answer within ``timeout`` seconds fails the call and the pool of that world
size is torn down and rebuilt on next use, so a hang in the code under test never hangs the caller.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

DEFAULT_TIMEOUT_S = float(os.environ.get("SEQPAR_TEST_TIMEOUT_S", "120"))
# After one rank has failed, how long the others get to finish (they may be stuck waiting for the failed one).
FAILURE_GRACE_S = 15.0


class RankError(AssertionError):
    """One or more ranks raised; the message holds their tracebacks."""


class RankTimeout(AssertionError):
    """One or more ranks did not answer in time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(
    rank: int, world_size: int, port: int, sys_path: list[str], comm_timeout_s: float, tasks, results
) -> None:
    sys.path[:] = sys_path
    os.environ.setdefault("SEQPAR_COMM_TIMEOUT_S", str(comm_timeout_s))
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=comm_timeout_s),
    )
    results.put(("ready", rank, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            value = fn(*args, **kwargs)
            results.put((task_id, rank, ("ok", value)))
        except BaseException:  # noqa: BLE001 -- report everything, the test decides
            results.put((task_id, rank, ("error", traceback.format_exc())))
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` rank processes with an initialised gloo process group, fed one task at a time.

    ``comm_timeout_s`` bounds the ranks' collectives (and is their default ``SEQPAR_COMM_TIMEOUT_S``).
    """

    def __init__(self, world_size: int, start_timeout_s: float = 180.0, comm_timeout_s: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, world_size, port, list(sys.path), comm_timeout_s, self.tasks[r], self.results),
                daemon=True,
                name=f"seqpar-rank{r}-of-{world_size}",
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._next_id = 0
        ready = set()
        deadline = time.monotonic() + start_timeout_s
        while len(ready) < world_size:
            try:
                tag, rank, _ = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                missing = sorted(set(range(world_size)) - ready)
                raise RankTimeout(f"world size {world_size}: ranks {missing} did not start")
            if tag == "ready":
                ready.add(rank)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list[Any]:
        self._next_id += 1
        task_id = self._next_id
        for q in self.tasks:
            q.put((task_id, fn, args, kwargs))
        answers: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                got_id, rank, answer = self.results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not self.alive():  # a rank died: give the others a moment to report what they saw
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                    if all(r in answers for r, p in enumerate(self.procs) if p.is_alive()):
                        break
                continue
            if got_id != task_id:
                continue  # a late answer from an earlier, abandoned task
            answers[rank] = answer
            if answer[0] == "error":
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        errors = {r: a[1] for r, a in answers.items() if a[0] == "error"}
        missing = sorted(set(range(self.world_size)) - set(answers))
        if errors or missing:
            parts = [f"--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())]
            if missing:
                grace = f", or {FAILURE_GRACE_S:.0f} s after another rank failed" if errors else ""
                parts.append(f"--- ranks {missing} did not answer within the timeout ({timeout:.0f} s{grace})")
            message = f"{fn.__qualname__} on world size {self.world_size}:\n" + "\n".join(parts)
            raise (RankError if errors else RankTimeout)(message)
        return [answers[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)


_pools: dict[int, WorkerPool] = {}


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    Tests of expected errors should catch them inside ``fn`` and return them: a rank that raises makes the
    pool suspect (peers may be stuck in a collective, or hold unmatched messages that a later test would
    receive), so after any failure the pool is torn down and rebuilt on next use.

    Raises:
        RankError: some rank raised (message: each failing rank's traceback).
        RankTimeout: some rank did not answer within ``timeout`` seconds.
    """
    pool = _pools.get(world_size)
    if pool is not None and not pool.alive():
        pool.close()
        pool = None
    if pool is None:
        pool = _pools[world_size] = WorkerPool(world_size)
    try:
        return pool.run(fn, args, kwargs, timeout)
    except (RankError, RankTimeout):
        pool.close()
        _pools.pop(world_size, None)
        raise


def shutdown_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def run_ranks(
    fn: Callable, world_size: int, *args: Any, timeout: float = 3600.0, comm_timeout_s: float = 300.0
) -> list[Any]:
    """Run ``fn(*args)`` once on ``world_size`` freshly started gloo ranks and stop them; results in rank order.

    For benchmarks, which want ranks that no earlier measurement has warmed or fragmented.

    Raises:
        RankError, RankTimeout: as ``run_distributed``.
    """
    pool = WorkerPool(world_size, comm_timeout_s=comm_timeout_s)
    try:
        return pool.run(fn, args, {}, timeout)
    finally:
        pool.close()
