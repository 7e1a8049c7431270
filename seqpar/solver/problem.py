"""One step's planning problem, prepared once: checked lengths, candidate group shapes, time and fit tables.

A group *shape* is ``(degree, strategy)``, the strategy a cost-model name (``CostModel.split_strategy``). Every
valid shape of every power-of-two degree up to the world size is a candidate (the allowed strategies default to
the registry's ``planner_defaults``); at degree 1 all strategies cost the same, so only the first is kept.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from seqpar import strategies as registry
from seqpar.solver.cost_model import CostModel
from seqpar.solver.plan import Group, Plan

__all__ = ["Problem", "check_seq_lens", "build_plan"]


def check_seq_lens(seq_lens: Sequence[int]) -> np.ndarray:
    """The lengths as an int64 array. Raises ValueError if empty, not integers, or not positive."""
    if isinstance(seq_lens, (str, bytes)):
        raise ValueError("seq_lens must be a sequence of positive integers, got a string")
    try:
        values = list(seq_lens)
    except TypeError as err:
        raise ValueError(f"seq_lens must be a sequence of positive integers: {err}") from err
    if not values:
        raise ValueError("seq_lens is empty; a step needs at least one sequence")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"seq_lens[{i}]={v!r} must be an integer number of tokens")
        if v <= 0:
            raise ValueError(f"seq_lens[{i}]={v} must be positive (drop empty sequences before planning)")
    return np.asarray(values, dtype=np.int64)


class Problem:
    """Lengths, shapes and, per shape, every sequence's time (``times``) and whether it fits (``fits``).

    Raises ValueError (from the constructor) for bad lengths, a cluster that cannot be split into
    power-of-two node-aligned groups, unknown strategies, or a sequence that fits on no group shape.
    """

    def __init__(self, seq_lens: Sequence[int], cost_model: CostModel, *,
                 strategies: Sequence[str] | None = None, linear_strategies: Sequence[str] | None = None) -> None:
        self.lengths = check_seq_lens(seq_lens)
        self.cost_model = cost_model
        cluster = cost_model.cluster
        cluster.check_plannable()
        self.world = cluster.world_size
        strategies = registry.planner_defaults("softmax") if strategies is None else strategies
        linear_strategies = registry.planner_defaults("linear") if linear_strategies is None else linear_strategies
        _check_names(cost_model, strategies, linear_strategies)
        self.shapes: list[tuple[int, str]] = []
        degree = 1
        while degree <= self.world:
            names = cost_model.strategy_names(degree, strategies, linear_strategies)
            self.shapes += [(degree, n) for n in (names[:1] if degree == 1 else names)]
            degree *= 2
        if not any(d == 1 for d, _ in self.shapes):
            raise ValueError("no strategy is valid at degree 1; pass at least one strategy")
        self.degrees = np.array([d for d, _ in self.shapes])
        self.times = np.stack([cost_model.seq_times(self.lengths, d, s) for d, s in self.shapes])
        mems = np.stack([cost_model.seq_memories(self.lengths, d, s) for d, s in self.shapes])
        self.fits = mems <= cluster.mem_bytes
        unplaceable = np.flatnonzero(~self.fits.any(axis=0))
        if unplaceable.size:
            i = int(unplaceable[0])
            raise ValueError(
                f"seq_lens[{i}]={int(self.lengths[i])} does not fit in memory even on all {self.world} ranks: it "
                f"needs {mems[:, i].min():.4g} bytes per rank, cluster.mem_bytes={cluster.mem_bytes:.4g}; "
                "shorten or drop it, or plan on a larger world"
            )
        masked = np.where(self.fits, self.times, np.inf)
        self.best_time = masked.min(axis=0)  # fastest feasible time of each sequence
        self.best_area = (masked * self.degrees[:, None]).min(axis=0)  # fewest rank-seconds

    @property
    def n(self) -> int:
        return int(self.lengths.size)

    def lower_bound(self) -> float:
        """max(longest single-sequence best time, total best rank-seconds / world size)."""
        return max(float(self.best_time.max()), float(self.best_area.sum()) / self.world)

    def refined_lower_bound(self) -> float:
        """A tighter bound: whatever shape sequence i runs on, T >= its time there and
        T * world >= its rank-seconds there + everyone else's fewest; max over i of the min over shapes."""
        masked = np.where(self.fits, self.times, np.inf)
        area = masked * self.degrees[:, None]
        rest = self.best_area.sum() - self.best_area  # (n,)
        per_shape = np.maximum(masked, (rest[None, :] + area) / self.world)
        return max(self.lower_bound(), float(per_shape.min(axis=0).max()))

    def makespan(self, group_shapes: Sequence[int], assign: np.ndarray) -> float:
        """Makespan of an assignment (``assign[i]`` = group of sequence i; groups given by shape index)."""
        loads = np.zeros(len(group_shapes))
        shapes = np.asarray(group_shapes)[assign]
        np.add.at(loads, assign, self.times[shapes, np.arange(self.n)])
        return float(loads.max())

    def to_plan(self, group_shapes: Sequence[int], assign: np.ndarray, *, status: str, note: str,
                bucket_cost_ratio: float = 1.0) -> Plan:
        """A ``Plan`` of groups given by shape index and ``assign[i]`` = group of sequence i."""
        return build_plan(self.cost_model, self.lengths, [self.shapes[s] for s in group_shapes], assign,
                          status=status, note=note, bucket_cost_ratio=bucket_cost_ratio)


def build_plan(cost_model: CostModel, lengths: np.ndarray, group_shapes: Sequence[tuple[int, str]],
               assign: np.ndarray, *, status: str, note: str, bucket_cost_ratio: float = 1.0) -> Plan:
    """A ``Plan``: groups placed largest first on consecutive ranks, timed by ``CostModel.group_time``.

    Placing power-of-two groups in decreasing size on consecutive ranks aligns every group to its own
    size, so none straddles a node unless it is made of whole nodes.
    """
    order = sorted(range(len(group_shapes)), key=lambda g: -group_shapes[g][0])
    members: dict[int, list[int]] = {g: [] for g in order}
    for i, g in enumerate(np.asarray(assign).tolist()):
        members[g].append(i)
    groups, start = [], 0
    for g in order:
        degree, strategy = group_shapes[g]
        seqs = members[g]
        time = cost_model.group_time(lengths[seqs].tolist(), degree, strategy)
        softmax, linear = cost_model.split_strategy(strategy)
        groups.append(Group(tuple(range(start, start + degree)), softmax, linear, seqs, time))
        start += degree
    if start != cost_model.cluster.world_size:
        raise AssertionError(f"groups cover {start} ranks, world is {cost_model.cluster.world_size}")
    return Plan(groups, max(g.predicted_time_s for g in groups), status, note, bucket_cost_ratio)


def _check_names(cost_model: CostModel, strategies: Sequence[str], linear_strategies: Sequence[str]) -> None:
    for arg, allowed, values in (("strategies", registry.names("softmax"), strategies),
                                 ("linear_strategies", registry.names("linear"), linear_strategies)):
        if isinstance(values, str):
            raise ValueError(f"{arg} must be a sequence of names, got the string {values!r}; wrap it in a tuple")
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{arg} contains unknown {bad}; choose from {allowed}")
    if cost_model.model.num_softmax_layers and not strategies:
        raise ValueError("strategies is empty but the model has softmax layers; allow at least one")
    if cost_model.model.num_linear_layers and not linear_strategies:
        raise ValueError("linear_strategies is empty but the model has linear layers; allow at least one")
