"""Solve the next step's plan off the critical path.

Time-limited MILP solves can differ between ranks, so only rank 0 plans; the runtime broadcasts
``Plan.to_json()`` bytes and every rank uses ``Plan.from_json``. ``PlanPrefetcher`` is rank 0's part:
``submit(step, seq_lens)`` as soon as step ``step``'s lengths are known (e.g. while step ``step - 1``
trains), ``get(step)`` when it is needed. The worker is a separate process by default (``spawn``, so it
never forks a CUDA context), or a thread.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Sequence

import numpy as np

from seqpar.solver.cost_model import CostModel
from seqpar.solver.plan import Plan
from seqpar.solver.planner import plan_step

__all__ = ["PlanPrefetcher"]


class PlanPrefetcher:
    """Plans steps in one background worker, in submission order.

    Args:
        cost_model: passed to ``plan_step``.
        use_process: a spawned worker process (default) or a thread.
        **plan_options: keyword options of ``plan_step`` (``time_limit_s``, ``strategies``, ...).

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, cost_model: CostModel, *, use_process: bool = True, **plan_options) -> None:
        self._cost_model = cost_model
        self._options = plan_options
        self._futures: dict[int, Future] = {}
        if use_process:
            self._executor: Executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        else:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="seqpar-plan")

    def submit(self, step: int, seq_lens: Sequence[int], *, cost_model: CostModel | None = None,
               **plan_options) -> None:
        """Start planning ``step`` (with ``cost_model`` and ``plan_options`` overriding the constructor's).

        Raises ValueError if ``step`` was already submitted and not taken."""
        if step in self._futures:
            raise ValueError(f"step={step} is already being planned; get() it before submitting it again")
        # numpy integers become ints (cheaper to pickle); anything else reaches plan_step's checks as is
        lengths = [int(v) if isinstance(v, np.integer) else v for v in seq_lens]
        options = {**self._options, **plan_options}
        self._futures[step] = self._executor.submit(plan_step, lengths, cost_model or self._cost_model, **options)

    def discard(self, step: int) -> None:
        """Forget ``step`` (cancelled if it has not started; its result is dropped otherwise)."""
        future = self._futures.pop(step, None)
        if future is not None:
            future.cancel()

    def get(self, step: int, timeout: float | None = None) -> Plan:
        """The plan of ``step`` (waits for it). Re-raises ``plan_step``'s ValueError for bad input.

        Raises:
            ValueError: ``step`` was never submitted.
            TimeoutError: not ready within ``timeout`` seconds (the step stays pending).
        """
        if step not in self._futures:
            raise ValueError(f"step={step} was not submitted; call submit(step, seq_lens) first")
        plan = self._futures[step].result(timeout)
        del self._futures[step]
        return plan

    def close(self) -> None:
        """Stop the worker (pending plans are cancelled)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PlanPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
