"""Solve the next step's plan off the critical path.

Time-limited MILP solves can differ between ranks, so only rank 0 plans; the runtime broadcasts
``Plan.to_json()`` bytes and every rank uses ``Plan.from_json``. ``PlanPrefetcher`` is rank 0's part:
``submit(step, seq_lens)`` as soon as step ``step``'s lengths are known (e.g. while step ``step - 1``
trains), ``get(step)`` when it is needed.

The worker is a child process by default (``python -m seqpar.solver.plan_worker``), not a thread: a solve is
pure Python, and in a thread it holds the GIL that the training thread needs between every operator it
launches, so each launch waits for the solver (measured on this CPU: a 16 ms solve beside a 595 ms forward and
backward made it 31 ms slower, twice the solve's own CPU time). The child imports neither torch nor the training
script, so it starts in a fraction of a second, and it is started with ``subprocess``, so a daemonic rank process
(a test harness's) can have one too. It runs at a lower CPU priority (``niceness``): where the ranks share cores
it solves mostly while they wait in collectives.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from seqpar.solver.cost_model import CostModel
from seqpar.solver.plan import Plan
from seqpar.solver.planner import plan_step

__all__ = ["PlanPrefetcher", "WorkerExited", "WORKER_NICENESS"]

WORKER_NICENESS = 10  # added to the worker's nice value: below the ranks', not starved by them (19 would be)


class WorkerExited(RuntimeError):
    """The planning worker process ended (killed, crashed) before it returned a plan."""


def send_frame(stream: BinaryIO, obj: Any) -> None:
    """Write ``obj`` as one length-prefixed pickle frame (the worker protocol) and flush."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def receive_frame(stream: BinaryIO) -> Any:
    """Read one frame written by ``send_frame``. Raises EOFError when the stream ends."""
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("stream ended")
    size = struct.unpack("<Q", header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("stream ended inside a frame")
    return pickle.loads(data)


class PlanPrefetcher:
    """Plans steps in one background worker, in submission order.

    Args:
        cost_model: passed to ``plan_step``.
        use_process: a child process (default) or a thread of this process.
        niceness: added to the child process's nice value (``WORKER_NICENESS``; ignored for a thread).
        **plan_options: keyword options of ``plan_step`` (``time_limit_s``, ``strategies``, ...).

    Use as a context manager, or call ``close()``. A step ``discard``-ed while its solve runs still finishes in
    the worker (the solve holds its own deadline); its result is dropped.
    """

    def __init__(self, cost_model: CostModel, *, use_process: bool = True, niceness: int = WORKER_NICENESS,
                 **plan_options) -> None:
        self._cost_model = cost_model
        self._options = plan_options
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._by_id: dict[int, Future] = {}  # the process worker's requests not yet answered
        self._ended = threading.Event()  # set (with _lock held) once the worker's replies have ended
        self._executor: ThreadPoolExecutor | None = None
        self._process: subprocess.Popen | None = None
        if use_process:
            root = str(Path(__file__).resolve().parents[2])  # the directory seqpar imports from
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            self._process = subprocess.Popen([sys.executable, "-m", "seqpar.solver.plan_worker", str(int(niceness))],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            # neither the reader thread nor the finalizer holds this object, so dropping the last reference to it
            # ends the worker (its input closes) as close() does
            self._reader = threading.Thread(target=_read_replies, name="seqpar-plan-replies", daemon=True,
                                            args=(self._process, self._lock, self._by_id, self._ended))
            self._reader.start()
            self._finalizer = weakref.finalize(self, _stop_worker, self._process, self._reader)
        else:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="seqpar-plan")

    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid (None for a thread worker)."""
        return None if self._process is None else self._process.pid

    def submit(self, step: int, seq_lens: Sequence[int], *, cost_model: CostModel | None = None,
               **plan_options) -> None:
        """Start planning ``step`` (with ``cost_model`` and ``plan_options`` overriding the constructor's).

        Raises:
            ValueError: ``step`` was already submitted and not taken.
            WorkerExited: the worker process has ended (``close`` this prefetcher and start another).
        """
        if step in self._futures:
            raise ValueError(f"step={step} is already being planned; get() it before submitting it again")
        # numpy integers become ints (cheaper to pickle); anything else reaches plan_step's checks as is
        lengths = [int(v) if isinstance(v, np.integer) else v for v in seq_lens]
        options = {**self._options, **plan_options}
        model = cost_model or self._cost_model
        if self._executor is not None:
            self._futures[step] = self._executor.submit(plan_step, lengths, model, **options)
            return
        future: Future = Future()
        with self._lock:
            if self._ended.is_set():
                raise WorkerExited(f"the planning worker (pid {self._process.pid}) has exited with code "
                                   f"{self._process.poll()}")
            request_id, self._next_id = self._next_id, self._next_id + 1
            self._by_id[request_id] = future
        try:
            send_frame(self._process.stdin, (request_id, lengths, model, options))
        except OSError as err:  # the pipe broke: the worker is gone
            with self._lock:
                self._by_id.pop(request_id, None)
            raise WorkerExited(f"the planning worker (pid {self._process.pid}) has exited: {err}") from err
        self._futures[step] = future

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
            WorkerExited: the worker process ended before it answered (the step is forgotten).
        """
        if step not in self._futures:
            raise ValueError(f"step={step} was not submitted; call submit(step, seq_lens) first")
        future = self._futures[step]
        try:
            return future.result(timeout)
        finally:
            if future.done():  # answered or failed: forgotten; a TimeoutError leaves it pending
                del self._futures[step]

    def close(self) -> None:
        """Stop the worker (pending plans are cancelled; a running solve ends at its deadline, or is killed after
        a few seconds)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            return
        self._finalizer()

    def __enter__(self) -> PlanPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_worker(process: subprocess.Popen, reader: threading.Thread) -> None:
    """End the worker: its input closes, so it exits after the solve it runs (which keeps its own deadline);
    killed if it has not within a few seconds."""
    try:
        process.stdin.close()
    except OSError:
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    reader.join(timeout=5)


def _read_replies(process: subprocess.Popen, lock: threading.Lock, by_id: dict[int, Future],
                  ended: threading.Event) -> None:
    """The reader thread: resolves each request's future (``by_id``) from the worker's replies; when the worker's
    output ends, fails every unanswered request with WorkerExited (nothing waits forever on a dead worker)."""
    try:
        while True:
            request_id, ok, payload = receive_frame(process.stdout)
            with lock:
                future = by_id.pop(request_id, None)
            if future is None or not future.set_running_or_notify_cancel():
                continue  # discarded
            if ok:
                future.set_result(Plan.from_json(payload))
            else:
                kind, message = payload
                future.set_exception(ValueError(message) if kind == "ValueError" else
                                     RuntimeError(f"plan_step failed in the planning worker: {kind}: {message}"))
    except (EOFError, OSError, pickle.UnpicklingError):
        pass
    code = process.wait()
    with lock:  # no request is added after this (submit checks ``ended`` under the lock)
        ended.set()
        orphans = list(by_id.values())
        by_id.clear()
    for future in orphans:
        if future.set_running_or_notify_cancel():
            future.set_exception(WorkerExited(f"the planning worker (pid {process.pid}) exited with code {code} "
                                              "before it returned the plan"))
