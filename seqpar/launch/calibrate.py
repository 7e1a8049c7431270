"""Calibrate the planner's cost model on the machine it plans for: a short profile, a fit, a cache file.

``profile`` times one forward + backward of the wrapped model for every group shape the planner may use
(each power-of-two degree up to the world, each strategy valid there) at several sequence lengths (256, 1024
and 4096 tokens by default), so that the linear (dense) and quadratic (attention) terms separate and the
attention term is measured at the lengths where it dominates, and once with ``PACKED_SEQUENCES`` short sequences
of unequal lengths packed into each group's call (``packed_lengths``: what a sequence costs in a packed call apart
from its tokens); every group of the world runs one sequence (call) at once, as in a plan, and a shape's time
is the slowest rank's least over ``repeats`` rounds (every shape once per round, interleaved, so load from
other jobs hits all alike). ``CostModel.calibrate`` fits the coefficients to those measurements.

``profile_static_plans`` then times every static plan on a few of the run's own batches, and
``solver.calibrate_static_scales`` scales each group shape so that its static plans predict what they measured:
the synthetic profile gives the shape of the cost, the real batches its level (and so which static plan is
the fastest, the baseline ``plan_step`` leaves only for a gain beyond the error left).
``calibrated_cost_model`` does it all once and caches the result in a JSON file (reused while the model, the
world size, the profile lengths and the batches match).

    seqpar-train --strategy auto --calibrate          # profile once, cache, plan with the calibrated model
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from seqpar.collectives import comm

from seqpar.solver import (
    CostCoefficients,
    CostModel,
    Measurement,
    StaticPlanMeasurement,
    calibrate_static_scales,
    static_plan,
)
from seqpar.solver.problem import build_plan

__all__ = ["DEFAULT_LENGTHS", "profile", "profile_static_plans", "calibrated_cost_model", "use_cost_model"]

DEFAULT_LENGTHS = (256, 1024, 4096)  # the longest anchors attention time where long-tail batches need it
_CACHE_VERSION = 9  # 2: least of interleaved rounds, strategy_terms; 3: packed sequences; 4: of unequal lengths;
# 5: effective_cores; 6: strategy_terms per degree; 7: plan_margin; 8: shape_scales from the run's batches;
# 9: static plans balanced by tokens (the scales are fitted on static plans' layouts)
PACKED_SEQUENCES = 16  # sequences per group in the profile's packed calls


def profile(sp_model: Any, cost_model: CostModel, *, lengths: Sequence[int] = DEFAULT_LENGTHS, repeats: int = 3,
            vocab_size: int = 256, device: torch.device | str = "cpu") -> list[Measurement]:
    """Measured seconds of one training step of one sequence per group, for every shape and length.

    Every rank of the SP group must call it (it runs collectives). Gradients are zeroed afterwards.

    Raises:
        ValueError: fewer than two distinct ``lengths``, or ``repeats < 1``.
    """
    if len(set(lengths)) < 2:
        raise ValueError(f"lengths: need two distinct lengths to separate dense from attention time, got {lengths}")
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    world = cost_model.cluster.world_size
    gen = torch.Generator().manual_seed(0)
    cases = []
    for degree, strategy in _planner_shapes(cost_model):
        for length in lengths:
            seqs = [torch.randint(0, vocab_size, (int(length),), generator=gen).to(device)
                    for _ in range(world // degree)]
            plan = static_plan([int(length)] * len(seqs), cost_model, degree, strategy)
            cases.append((int(length), degree, strategy, seqs, plan, 1, None))
        # PACKED short sequences of unequal lengths per group, one call (as real batches are: equal lengths
        # would take the kernels' one-batched-call path): the cost of a sequence in a packed call apart from
        # its tokens (``CostCoefficients.packed_sequence_s``)
        call = packed_lengths(min(int(x) for x in lengths))
        groups = world // degree
        seqs = [torch.randint(0, vocab_size, (n,), generator=gen).to(device) for _ in range(groups) for n in call]
        # ranks left over (3 = 2 + 1) run idle degree-1 groups, as static_plan leaves them
        idle = [(1, cost_model.strategy_names(1)[0])] * (world - groups * degree)
        plan = build_plan(cost_model, np.array([int(s.numel()) for s in seqs]),
                          [(degree, strategy)] * groups + idle, np.repeat(np.arange(groups), len(call)),
                          status="static", note="calibration profile")
        cases.append((call, degree, strategy, seqs, plan, len(call), None))
    if cost_model.cluster.shares_cores:
        # ranks that share cores: the median length on the first half of the degree-1 groups, the others idle
        # (their placeholder calls), as a plan with short groups leaves them: how much the busy ranks speed up
        # (``CostCoefficients.effective_cores``)
        length = sorted(int(x) for x in lengths)[len(lengths) // 2]
        strategy, busy = cost_model.strategy_names(1)[0], (world + 1) // 2
        seqs = [torch.randint(0, vocab_size, (length,), generator=gen).to(device) for _ in range(busy)]
        plan = build_plan(cost_model, np.full(busy, length), [(1, strategy)] * world, np.arange(busy),
                          status="static", note="calibration profile: idle groups")
        cases.append((length, 1, strategy, seqs, plan, 1, busy))
    times = _least_of_rounds(sp_model, [(seqs, plan) for _, _, _, seqs, plan, _, _ in cases], repeats)
    return [Measurement(length, degree, strategy, t, busy_groups=busy) if packed == 1 else
            Measurement(round(sum(length) / packed), degree, strategy, t, packed, tuple(length))
            for (length, degree, strategy, _, _, packed, busy), t in zip(cases, times)]


def profile_static_plans(sp_model: Any, cost_model: CostModel, batches: Sequence[Sequence[int]], *,
                         repeats: int = 3, vocab_size: int = 256,
                         device: torch.device | str = "cpu") -> list[StaticPlanMeasurement]:
    """Measured seconds of one training step of every static plan (each degree, each strategy valid there; the
    planner's shapes) on each of ``batches`` (sequence lengths: the run's own first steps), the least of
    ``repeats`` interleaved rounds after a warm-up, as ``profile``.

    Every rank of the SP group must call it (it runs collectives). Gradients are zeroed afterwards.

    Raises:
        ValueError: no ``batches``, ``repeats < 1``, or a batch ``static_plan`` refuses (bad lengths).
    """
    if not batches:
        raise ValueError("batches: need at least one batch of sequence lengths to time the static plans on")
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    gen = torch.Generator().manual_seed(1)
    cases = []
    for degree, strategy in _planner_shapes(cost_model):
        for lengths in batches:
            lengths = [int(n) for n in lengths]
            seqs = [torch.randint(0, vocab_size, (n,), generator=gen).to(device) for n in lengths]
            cases.append((lengths, degree, strategy, seqs, static_plan(lengths, cost_model, degree, strategy)))
    times = _least_of_rounds(sp_model, [(seqs, plan) for _, _, _, seqs, plan in cases], repeats)
    return [StaticPlanMeasurement(tuple(lengths), degree, strategy, t)
            for (lengths, degree, strategy, _, _), t in zip(cases, times)]


def _planner_shapes(cost_model: CostModel) -> list[tuple[int, str]]:
    """The ``(degree, strategy)`` group shapes the planner uses: every strategy valid at each degree, one at
    degree 1 (where strategies communicate nothing and run alike)."""
    shapes = []
    for degree in cost_model.cluster.degrees():
        names = cost_model.strategy_names(degree)
        shapes += [(degree, name) for name in (names[:1] if degree == 1 else names)]
    return shapes


def _least_of_rounds(sp_model: Any, steps: list[tuple[list[torch.Tensor], Any]], repeats: int) -> list[float]:
    """Each ``(sequences, plan)`` step's least time over ``repeats`` rounds after a warm-up round; every round runs
    every step once, so a burst of load from other jobs hits all alike, and the least is what the step costs when
    the machine lets it run (noise only adds time). Gradients are zeroed afterwards."""
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(repeats + 1):
        for k, (seqs, plan) in enumerate(steps):
            elapsed = _time_step(sp_model, seqs, plan, sp_model.runner.group)
            if round_:
                times[k].append(elapsed)
    sp_model.module.zero_grad(set_to_none=True)
    return [min(t) for t in times]


def packed_lengths(shortest: int) -> list[int]:
    """The profile's packed call: ``PACKED_SEQUENCES`` distinct lengths from ``shortest / 8`` to ``3 shortest / 8``
    (their mean a quarter of ``shortest``: many short sequences, the case where the per-sequence cost shows)."""
    low, high = max(1, shortest // 8), max(2, 3 * shortest // 8)
    return [round(low + (high - low) * k / (PACKED_SEQUENCES - 1)) for k in range(PACKED_SEQUENCES)]


def _time_step(sp_model: Any, sequences: list[torch.Tensor], plan: Any, group: Any) -> float:
    dist.barrier(group=group)
    started = time.perf_counter()
    prepared = sp_model.prepare(sequences, plan=plan)
    for local in prepared if isinstance(prepared, list) else [prepared]:
        sp_model(**local).loss.backward()
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slowest group sets the step
    return float(elapsed.item())


def calibrated_cost_model(sp_model: Any, cost_model: CostModel, path: Path | str, *, model_name: str,
                          lengths: Sequence[int] = DEFAULT_LENGTHS, repeats: int = 3, vocab_size: int = 256,
                          device: torch.device | str = "cpu",
                          batches: Sequence[Sequence[int]] | None = None) -> CostModel:
    """``cost_model`` with coefficients fitted to this machine: read from ``path`` when it holds a calibration
    of the same model name, world size, lengths and batches, else profiled (every rank), fitted and written
    (rank 0). With ``batches`` (sequence lengths of the run's first steps), the fit's ``shape_scales`` then come
    from every static plan timed on them (``profile_static_plans``, ``solver.calibrate_static_scales``).

    Rank 0 alone reads the cache and broadcasts what it found, so every rank takes the same branch (a rank that
    does not see the file, on another node or before rank 0 has written it, would otherwise profile alone and
    wait in collectives the others never start); the file is written atomically and every rank returns only
    after it is in place."""
    path = Path(path)
    key = {"model": model_name, "world_size": cost_model.cluster.world_size, "lengths": [int(x) for x in lengths],
           "batches": None if batches is None else [[int(n) for n in b] for b in batches]}
    found = b"null"  # JSON: no usable cache
    if dist.get_rank() == 0:
        cached = _read(path)
        if cached is not None and cached.get("key") == key:
            found = json.dumps(cached["coefficients"]).encode()
    coefficients = json.loads(comm.broadcast_bytes(found, src=0))
    if coefficients is not None:
        return replace(cost_model, coefficients=CostCoefficients(**coefficients))
    data = profile(sp_model, cost_model, lengths=lengths, repeats=repeats, vocab_size=vocab_size, device=device)
    fitted = cost_model.calibrate(data)
    plans = []
    if batches is not None:
        plans = profile_static_plans(sp_model, fitted, batches, repeats=repeats, vocab_size=vocab_size,
                                     device=device)
        fitted = calibrate_static_scales(fitted, plans)
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": _CACHE_VERSION, "key": key, "coefficients": asdict(fitted.coefficients),
                   "measurements": [asdict(m) for m in data],
                   "predicted_s": [m.predicted(fitted) for m in data],
                   "static_plans": [asdict(m) for m in plans],
                   "static_plans_predicted_s": [static_plan(list(m.lengths), fitted, m.degree, m.strategy).makespan_s
                                                for m in plans]}
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(payload, indent=1))
        partial.replace(path)
    comm.broadcast_bytes(b"written", src=0)  # no rank goes on (or reads the file) before it is complete
    return fitted


def use_cost_model(sp_model: Any, cost_model: CostModel) -> None:
    """Make ``sp_model`` (``strategy="auto"``) plan with ``cost_model`` from its next step on."""
    sp_model.config = replace(sp_model.config, cost_model=cost_model)
    sp_model.runner.config = sp_model.config


def _read(path: Path) -> dict | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("version") == _CACHE_VERSION else None
