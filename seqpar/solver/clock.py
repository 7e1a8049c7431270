"""The clock the planner's deadlines are read on: wall time, or the planning thread's CPU time.

``plan_step(..., clock="wall")`` (the default) keeps ``time_limit_s`` in wall-clock seconds: a plan made inside a
step stalls every rank for exactly that long. A plan made beside training on cores the ranks share (CPU ranks,
``seqpar.runtime.steps.StepRunner.plan_ahead``) counts CPU seconds instead (``clock="cpu"``): there each CPU second
the solve takes is one the ranks lose, so its budget is a CPU budget; and on a wall clock a solve starved by the
ranks gets less search for the same budget (measured beside 4 busy ranks on 2 cores: a 10 ms wall budget used
9-25 ms of CPU, or scored one static plan of eight).

The clock is per thread (a prefetching thread and an inline solve do not share it). Every deadline in the solver
modules is a reading of ``now()``; the MILP's solver process runs on wall time (``milp.solve_milp`` converts).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

__all__ = ["CLOCKS", "now", "reading"]

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_local = threading.local()


def now() -> float:
    """The current reading of this thread's planner clock (``time.perf_counter()`` unless ``reading`` set another)."""
    return getattr(_local, "clock", time.perf_counter)()


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Read this thread's deadlines on ``CLOCKS[name]`` inside the block.

    Raises:
        ValueError: ``name`` is not a key of ``CLOCKS``.
    """
    if name not in CLOCKS:
        raise ValueError(f"clock: expected one of {sorted(CLOCKS)}, got {name!r}")
    before = getattr(_local, "clock", None)
    _local.clock = CLOCKS[name]
    try:
        yield
    finally:
        if before is None:
            del _local.clock
        else:
            _local.clock = before
