"""One step's planning problem, prepared once: checked lengths, candidate group shapes, time and fit tables.

A group *shape* is ``(degree, strategy)``, the strategy a cost-model name (``CostModel.split_strategy``). Every
valid shape of every power-of-two degree up to the world size is a candidate (the allowed strategies default to
the registry's ``planner_defaults``); at degree 1 all strategies cost the same, so only the first is kept.

The search works on an ADDITIVE SURROGATE of the packed cost model: a group of shape s holding sequences I costs
``const[s] + sum_{i in I} times[s, i]``, where ``const[s] = CostModel.call_overhead`` (latency and overhead paid
once per packed call) and ``times[s, i] = seq_time(i) - const[s]``. It is exact for one sequence, for Ulysses and
all-gather K,V (their terms are sums plus a per-call constant) and at degree 1; for the overlapped strategies
(ring, TokenRing, USP, LASP-2, ZeCO) packing can hide one sequence's communication behind another's compute,
so the packed time may be lower. Every candidate plan is re-scored with the packed model (``build_plan``),
and only the exact search (``exact_plan``, small instances) or meeting ``lower_bound`` proves optimality.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from seqpar import strategies as registry
from seqpar.solver.cost_model import CostModel
from seqpar.solver.plan import Group, Plan

__all__ = ["Problem", "check_seq_lens", "build_plan", "split_calls", "exact_plan", "EXACT_MAX_SEQUENCES"]


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
    """Lengths, shapes and, per shape, the surrogate tables (``times``, ``const``) and which sequences fit
    (``fits``: a packed call of the sequence alone fits in memory; ``cap``: the most tokens one call may pack).

    ``deadline`` (a ``time.perf_counter()`` value) stops the table building early with ``TimeoutError``.

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
        for degree in cluster.degrees():
            names = cost_model.strategy_names(degree, strategies, linear_strategies)
            self.shapes += [(degree, n) for n in (names[:1] if degree == 1 else names)]
        if not any(d == 1 for d, _ in self.shapes):
            raise ValueError("no strategy is valid at degree 1; pass at least one strategy")
        self.degrees = np.array([d for d, _ in self.shapes])
        self.single = np.stack([cost_model.seq_times(self.lengths, d, s) for d, s in self.shapes])
        self.const = np.array([cost_model.call_overhead(d, s) for d, s in self.shapes])
        self.times = np.maximum(self.single - self.const[:, None], 0.0)
        self.cap = np.array([cost_model.max_call_tokens(d, s) for d, s in self.shapes])
        self.fits = self.lengths[None, :] <= self.cap[:, None]
        self.compute = cost_model.compute_times(self.lengths, 1)  # rank-seconds no plan can avoid
        unplaceable = np.flatnonzero(~self.fits.any(axis=0))
        if unplaceable.size:
            i = int(unplaceable[0])
            need = min(cost_model.seq_memory(int(self.lengths[i]), d, s) for d, s in self.shapes)
            raise ValueError(
                f"seq_lens[{i}]={int(self.lengths[i])} does not fit in memory even on all {self.world} ranks: it "
                f"needs {need:.4g} bytes per rank, cluster.mem_bytes={cluster.mem_bytes:.4g}; "
                "shorten or drop it, or plan on a larger world"
            )
        masked = np.where(self.fits, self.single, np.inf)
        self.best_time = masked.min(axis=0)  # fastest feasible time of each sequence alone
        self.best_area = (np.where(self.fits, self.times, np.inf) * self.degrees[:, None]).min(axis=0)

    @property
    def n(self) -> int:
        return int(self.lengths.size)

    def lower_bound(self) -> float:
        """No plan is faster: max(the slowest sequence's best time alone, total compute / world size).

        Valid under the packed model: a group's time never drops when it gets more sequences, and every
        strategy's time is at least its compute, whose rank-seconds do not depend on the degree.
        """
        return max(float(self.best_time.max()), math.fsum(self.compute.tolist()) / self.world)

    def refined_lower_bound(self) -> float:
        """The same bound (kept for callers of the additive model's refined bound, which packing invalidates)."""
        return self.lower_bound()

    def makespan(self, group_shapes: Sequence[int], assign: np.ndarray) -> float:
        """Surrogate makespan of an assignment (``assign[i]`` = group of sequence i; groups by shape index)."""
        shapes = np.asarray(group_shapes)
        loads = np.zeros(len(group_shapes))
        np.add.at(loads, assign, self.times[shapes[assign], np.arange(self.n)])
        used = np.zeros(len(group_shapes), dtype=bool)
        used[assign] = True
        return float((loads + np.where(used, self.const[shapes], 0.0)).max())

    def to_plan(self, group_shapes: Sequence[int], assign: np.ndarray, *, status: str, note: str,
                bucket_cost_ratio: float = 1.0) -> Plan:
        """A ``Plan`` of groups given by shape index and ``assign[i]`` = group of sequence i (packed times)."""
        caps = {self.shapes[s]: int(self.cap[s]) for s in set(group_shapes)}
        return build_plan(self.cost_model, self.lengths, [self.shapes[s] for s in group_shapes], assign,
                          status=status, note=note, bucket_cost_ratio=bucket_cost_ratio, caps=caps)


def split_calls(lengths: np.ndarray, members: Sequence[int], cap: int) -> list[list[int]]:
    """``members`` cut into packed calls of at most ``cap`` tokens: first fit, longest first (few calls, each
    paying its per-call cost once). One call when they all fit; each list ascending."""
    if math.fsum(float(lengths[i]) for i in members) <= cap:
        return [sorted(members)]
    calls: list[list[int]] = []
    room: list[int] = []
    for i in sorted(members, key=lambda i: -int(lengths[i])):
        size = int(lengths[i])
        k = next((k for k, r in enumerate(room) if r >= size), None)
        if k is None:
            calls.append([])
            room.append(cap)
            k = len(calls) - 1
        calls[k].append(i)
        room[k] -= size
    return [sorted(c) for c in calls]


def build_plan(cost_model: CostModel, lengths: np.ndarray, group_shapes: Sequence[tuple[int, str]],
               assign: np.ndarray, *, status: str, note: str, bucket_cost_ratio: float = 1.0,
               caps: dict[tuple[int, str], int] | None = None) -> Plan:
    """A ``Plan``: groups placed largest first on consecutive ranks, timed by ``CostModel.group_time`` (packed).

    Placing power-of-two groups in decreasing size on consecutive ranks starts every group at a multiple of
    its size, so none straddles a node unless it is made of whole nodes (``Cluster.check_plannable``). A group
    whose sequences do not fit in one packed call (``CostModel.max_call_tokens``; ``caps`` caches it per shape)
    runs them as micro-batches (``split_calls``).
    """
    lengths = np.asarray(lengths)
    caps = {} if caps is None else caps
    order = sorted(range(len(group_shapes)), key=lambda g: -group_shapes[g][0])
    members: dict[int, list[int]] = {g: [] for g in order}
    for i, g in enumerate(np.asarray(assign).tolist()):
        members[g].append(i)
    groups, start = [], 0
    for g in order:
        degree, strategy = group_shapes[g]
        seqs = members[g]
        cap = caps.get((degree, strategy))
        if cap is None:
            cap = caps[(degree, strategy)] = cost_model.max_call_tokens(degree, strategy)
        calls = split_calls(lengths, seqs, cap) if seqs else [[]]
        micro = None if len(calls) == 1 else calls
        position = {i: k for k, i in enumerate(seqs)}
        time = cost_model.group_time(lengths[seqs].tolist(), degree, strategy,
                                     micro_batches=None if micro is None else [[position[i] for i in c]
                                                                               for c in micro])
        softmax, linear = cost_model.split_strategy(strategy)
        groups.append(Group(tuple(range(start, start + degree)), softmax, linear, seqs, time, micro))
        start += degree
    if start != cost_model.cluster.world_size:
        raise AssertionError(f"groups cover {start} ranks, world is {cost_model.cluster.world_size}")
    return Plan(groups, max(g.predicted_time_s for g in groups), status, note, bucket_cost_ratio)


def exact_plan(problem: Problem, *, deadline: float) -> tuple[list[int], np.ndarray, bool] | None:
    """The optimal plan under the packed model with one packed call per group, by dynamic programming over
    subsets of sequences and ranks used: ``f(mask, r)`` = least makespan running exactly the sequences of
    ``mask`` on groups of at most ``r`` ranks in all; a group takes the lowest sequence of ``mask`` and any
    subset of the rest, on its best shape of a power-of-two degree ``<= r``. Any multiset of power-of-two
    sizes summing to at most the world places node-aligned (``build_plan``), so ranks are the only coupling.

    Returns ``(group shapes, assignment, memory_bound)``; ``memory_bound`` is True when some group's sequences
    were ruled out because their packed call did not fit (micro-batched plans were then not searched, so the
    result is optimal only among plans of one call per group). None when ``deadline`` passes first.
    Cost: ``3^n * world * degrees`` steps: for ``n <= EXACT_MAX_SEQUENCES``.
    """
    n, world = problem.n, problem.world
    cm, lengths = problem.cost_model, problem.lengths
    full = (1 << n) - 1
    degrees = sorted(set(problem.degrees.tolist()))
    by_degree = {d: [s for s, (dd, _) in enumerate(problem.shapes) if dd == d] for d in degrees}
    memory_bound = False
    best_group: dict[tuple[int, int], tuple[float, int]] = {}

    def group_cost(d: int, sub: int) -> tuple[float, int]:
        nonlocal memory_bound
        key = (d, sub)
        if key not in best_group:
            seqs = [lengths[i] for i in range(n) if sub >> i & 1]
            tokens = sum(int(x) for x in seqs)
            best = (math.inf, -1)
            for s in by_degree[d]:
                if tokens > problem.cap[s]:
                    memory_bound = True
                    continue
                t = cm.call_time(seqs, d, problem.shapes[s][1])
                if t < best[0]:
                    best = (t, s)
            best_group[key] = best
        return best_group[key]

    f = {(0, r): (0.0, None) for r in range(world + 1)}
    for mask in range(1, full + 1):
        if time.perf_counter() > deadline:
            return None
        low = mask & -mask
        rest = mask ^ low
        for r in range(1, world + 1):
            best, arg = math.inf, None
            sub = rest
            while True:
                group = sub | low
                for d in degrees:
                    if d > r:
                        break
                    cost, s = group_cost(d, group)
                    if cost >= best:
                        continue
                    prev = f.get((mask ^ group, r - d), (math.inf, None))[0]
                    value = max(cost, prev)
                    if value < best:
                        best, arg = value, (group, d, s)
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            f[(mask, r)] = (best, arg)
    if not math.isfinite(f[(full, world)][0]):
        return None
    group_shapes: list[int] = []
    assign = np.empty(n, dtype=np.int64)
    mask, r = full, world
    while mask:
        group, d, s = f[(mask, r)][1]
        for i in range(n):
            if group >> i & 1:
                assign[i] = len(group_shapes)
        group_shapes.append(s)
        mask, r = mask ^ group, r - d
    used = sum(problem.shapes[s][0] for s in group_shapes)
    return group_shapes + [0] * (world - used), assign, memory_bound


EXACT_MAX_SEQUENCES = 8
EXACT_MAX_WORLD = 16


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
