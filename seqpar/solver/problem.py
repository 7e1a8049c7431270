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

import heapq
import math
from typing import Sequence

import numpy as np

from seqpar.solver import clock
from seqpar import strategies as registry
from seqpar.solver.cost_model import CostModel
from seqpar.solver.plan import Group, Plan

__all__ = ["Problem", "check_seq_lens", "build_plan", "placed_ranks", "split_calls", "exact_plan",
           "EXACT_MAX_SEQUENCES"]


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
    arr = np.asarray(values) if all(type(v) is int for v in values[:1]) else None
    if arr is not None and arr.dtype.kind == "i" and arr.ndim == 1 and bool((arr > 0).all()):
        return arr.astype(np.int64)  # the common case, checked without a Python loop per sequence
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"seq_lens[{i}]={v!r} must be an integer number of tokens")
        if v <= 0:
            raise ValueError(f"seq_lens[{i}]={v} must be positive (drop empty sequences before planning)")
    return np.asarray(values, dtype=np.int64)


class Problem:
    """Lengths, shapes and, per shape, the surrogate tables (``times``, ``const``) and which sequences fit
    (``fits``: a packed call of the sequence alone fits in memory; ``cap``: the most tokens one call may pack).

    ``deadline`` (a ``clock.now()`` value) stops the table building early with ``TimeoutError``.

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
        # the cost model is evaluated once per distinct length (100,000 tiny sequences have ~100 lengths)
        distinct, inverse = np.unique(self.lengths, return_inverse=True)
        self.single = np.stack([cost_model.seq_times(distinct, d, s) for d, s in self.shapes])[:, inverse]
        self.const = np.array([cost_model.call_overhead(d, s) for d, s in self.shapes])
        self.times = np.maximum(self.single - self.const[:, None], 0.0)
        self.cap = np.array([cost_model.max_call_tokens(d, s) for d, s in self.shapes])
        self.fits = self.lengths[None, :] <= self.cap[:, None]
        # rank-seconds no plan can avoid (a shape whose calls are scaled below the formulas runs them faster)
        least_scale = min(1.0, *(cost_model.coefficients.shape_scale(s, d) for d, s in self.shapes))
        self.compute = cost_model.compute_times(distinct, 1)[inverse] * least_scale
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

    def refined_lower_bound(self, *, deadline: float | None = None, rel_tol: float = 1e-3) -> float:
        """A stronger bound: the least makespan T at which a linear relaxation of the step fits on the world.

        Relaxation, for a trial T (``CostModel.call_time_minorants`` gives the two additive bounds of a packed
        call of shape s: ``o_s + sum compute[s, i]`` and ``c0_s + sum floor[s, i]``):

        * sequences are cut into buckets of lengths within a factor 1.05; a bucket may go (fractionally) to shape
          s only if its SHORTEST member fits in memory there and its time alone is at most T (every member is as
          long, so no member could go elsewhere), and each member is costed at the shortest member's cost per
          token (both bounds per token grow with the length: linear + quadratic terms);
        * ``m_s`` (real) groups of shape s must hold what they get: ``m_s (T - o_s) >= sum compute`` and
          ``m_s (T - c0_s) >= sum floor`` (each group's time is at most T and above both sums);
        * a sequence that cannot share a group with another as long within T (``2 compute > T - o_s`` or
          ``2 floor > T - c0_s``) needs a group of its own: ``m_s >= `` their count;
        * ranks: ``sum_s degree_s m_s <= world``.

        Infeasible at T means no plan has makespan T; the bound is the bisection's largest infeasible T (to
        ``rel_tol``), never below ``lower_bound``. Needs ``highspy`` (the ``highs`` extra) for the linear
        programs; without it, or when ``deadline`` (``clock.now()``) passes, what was proved so far.
        """
        lower = self.lower_bound()
        try:
            import highspy
        except ImportError:
            return lower
        terms = self._relaxation_terms()
        hi = lower * 1.25
        while not self._relaxation_feasible(terms, hi, highspy, whole_groups=False):
            lower, hi = hi, hi * 1.5
            if deadline is not None and clock.now() > deadline:
                return lower
        # bisect on the linear program first (fast), then on the one with whole groups (stronger), from there
        for whole_groups in (False, True):
            if whole_groups:
                hi = lower * 1.25
            while hi - lower > rel_tol * lower:
                if deadline is not None and clock.now() > deadline:
                    return lower
                mid = 0.5 * (lower + hi)
                if self._relaxation_feasible(terms, mid, highspy, whole_groups=whole_groups):
                    hi = mid
                else:
                    lower = mid
        return lower

    def _relaxation_terms(self) -> dict:
        """Per bucket of lengths (ratio 1.05) and shape: tokens, count and the per-token bounds of its shortest
        member, its time alone and whether it fits (``refined_lower_bound``)."""
        order = np.sort(self.lengths)
        edges = [0]
        while edges[-1] < order.size:  # a bucket: lengths from order[start] up to 1.03 times that
            start = edges[-1]
            edges.append(int(np.searchsorted(order, order[start] * 1.05, side="right")))
        starts = np.array(edges[:-1])
        shortest = order[starts].astype(np.float64)
        tokens = np.add.reduceat(order.astype(np.float64), starts)
        count = np.diff(np.array(edges)).astype(np.float64)
        cm = self.cost_model
        rows = {"compute": [], "floor": [], "o": [], "c0": [], "alone": []}
        for d, name in self.shapes:
            compute, o, floor, c0 = cm.call_time_minorants(shortest, d, name)
            rows["compute"].append(compute)
            rows["floor"].append(floor)
            rows["o"].append(o)
            rows["c0"].append(c0)
            rows["alone"].append(cm.seq_times(shortest, d, name))
        terms = {k: np.array(v) for k, v in rows.items()}
        terms.update(tokens=tokens, count=count, shortest=shortest,
                     fits=shortest[None, :] <= self.cap[:, None])
        return terms

    def _relaxation_feasible(self, terms: dict, T: float, highspy, *, whole_groups: bool) -> bool:
        """Whether ``refined_lower_bound``'s linear relaxation has a solution with makespan ``T``."""
        per_token_compute = terms["compute"] / terms["shortest"]
        per_token_floor = terms["floor"] / terms["shortest"]
        room_compute = T - terms["o"]
        room_floor = T - terms["c0"]
        allowed = terms["fits"] & (terms["alone"] <= T) & (room_compute > 0)[:, None] & (room_floor > 0)[:, None]
        n_shapes, n_buckets = allowed.shape
        if not allowed.any(axis=0).all():
            return False
        alone = ((2 * terms["compute"] > room_compute[:, None]) | (2 * terms["floor"] > room_floor[:, None]))
        pairs = np.argwhere(allowed)  # columns: x[s, b] = fraction of bucket b on shape s, then m[s]
        n_x = len(pairs)
        s_idx, b_idx = pairs[:, 0], pairs[:, 1]
        # rows: n_buckets equalities, then per shape: compute, floor, own-group counts
        col_rows, col_vals = [], []
        for k in range(n_x):
            s, b = int(s_idx[k]), int(b_idx[k])
            r = [b, n_buckets + 3 * s, n_buckets + 3 * s + 1]
            v = [1.0, per_token_compute[s, b] * terms["tokens"][b], per_token_floor[s, b] * terms["tokens"][b]]
            if alone[s, b]:
                r.append(n_buckets + 3 * s + 2)
                v.append(terms["count"][b])
            col_rows.append(r)
            col_vals.append(v)
        for s in range(n_shapes):
            col_rows.append([n_buckets + 3 * s, n_buckets + 3 * s + 1, n_buckets + 3 * s + 2])
            col_vals.append([-max(room_compute[s], 0.0), -max(room_floor[s], 0.0), -1.0])
        lp = highspy.HighsLp()
        lp.num_col_ = n_x + n_shapes
        lp.num_row_ = n_buckets + 3 * n_shapes
        lp.col_cost_ = np.concatenate([np.zeros(n_x), self.degrees.astype(np.float64)])
        lp.col_lower_ = np.zeros(lp.num_col_)
        lp.col_upper_ = np.full(lp.num_col_, highspy.kHighsInf)
        lp.row_lower_ = np.concatenate([np.ones(n_buckets), np.full(3 * n_shapes, -highspy.kHighsInf)])
        lp.row_upper_ = np.concatenate([np.ones(n_buckets), np.zeros(3 * n_shapes)])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum([len(r) for r in col_rows])]).astype(np.int32)
        lp.a_matrix_.index_ = np.concatenate(col_rows).astype(np.int32)
        lp.a_matrix_.value_ = np.concatenate(col_vals).astype(np.float64)
        if whole_groups:  # m[s] integer: a mixed-integer program, small (one integer per shape)
            lp.integrality_ = [highspy.HighsVarType.kContinuous] * n_x + [highspy.HighsVarType.kInteger] * n_shapes
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        # one thread, as the planner's MILP (milp._backend): HiGHS's task scheduler is global, and a later
        # solver asking for another thread count than the first one set up fails ("No Solution Found")
        h.setOptionValue("threads", 1)
        h.setOptionValue("time_limit", 2.0)
        h.setOptionValue("mip_rel_gap", 1e-4)
        h.passModel(lp)
        h.run()
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return False
        info = h.getInfo()
        if status != highspy.HighsModelStatus.kOptimal:
            # stopped early: infeasible only when even the proved bound needs more ranks than there are
            return not (whole_groups and info.mip_dual_bound > self.world * (1 + 1e-7))
        # a bound must err low, so a marginal case (within the solver's tolerances) counts as feasible
        bound = info.mip_dual_bound if whole_groups else info.objective_function_value
        return bound <= self.world * (1 + 1e-7)

    def packed_floor(self, group_shapes: Sequence[int], assign: np.ndarray) -> float:
        """A lower bound of the PACKED makespan of an assignment, in numpy (no call is timed): the slowest
        group's larger ``CostModel.call_time_minorants`` sum. Lets the planner skip re-scoring a candidate that
        cannot beat the best plan found."""
        if not hasattr(self, "_minorants"):
            parts = [self.cost_model.call_time_minorants(self.lengths, d, name) for d, name in self.shapes]
            self._minorants = (np.stack([p[0] for p in parts]), np.array([p[1] for p in parts]),
                               np.stack([p[2] for p in parts]), np.array([p[3] for p in parts]))
        compute, o, floor, c0 = self._minorants
        shapes = np.asarray(group_shapes)
        cols = np.arange(self.n)
        by_compute = np.zeros(len(shapes))
        by_floor = np.zeros(len(shapes))
        np.add.at(by_compute, assign, compute[shapes[assign], cols])
        np.add.at(by_floor, assign, floor[shapes[assign], cols])
        used = np.zeros(len(shapes), dtype=bool)
        used[assign] = True
        bound = np.maximum(by_compute + o[shapes], by_floor + c0[shapes])
        return float(np.where(used, bound, 0.0).max())

    def group_loads(self, group_shapes: Sequence[int], assign: np.ndarray) -> np.ndarray:
        """Surrogate time of every group of an assignment (``assign[i]`` = group of sequence i; groups by shape
        index); 0 for a group without sequences."""
        shapes = np.asarray(group_shapes)
        loads = np.zeros(len(group_shapes))
        np.add.at(loads, assign, self.times[shapes[assign], np.arange(self.n)])
        used = np.zeros(len(group_shapes), dtype=bool)
        used[assign] = True
        return loads + np.where(used, self.const[shapes], 0.0)

    def makespan(self, group_shapes: Sequence[int], assign: np.ndarray) -> float:
        """Surrogate makespan of an assignment: its slowest group's ``group_loads``."""
        return float(self.group_loads(group_shapes, assign).max())

    def step_time(self, group_shapes: Sequence[int], assign: np.ndarray) -> float:
        """Surrogate step time of an assignment: ``CostModel.step_time`` of its ``group_loads`` on the ranks
        ``build_plan`` gives the groups (the makespan, unless ranks share cores)."""
        ranks = placed_ranks([self.shapes[s][0] for s in group_shapes])
        return self.cost_model.step_time(zip(ranks, self.group_loads(group_shapes, assign).tolist()))

    def to_plan(self, group_shapes: Sequence[int], assign: np.ndarray, *, status: str, note: str,
                bucket_cost_ratio: float = 1.0, calls: dict[int, list[list[int]]] | None = None) -> Plan:
        """A ``Plan`` of groups given by shape index and ``assign[i]`` = group of sequence i (packed times)."""
        caps = {self.shapes[s]: int(self.cap[s]) for s in set(group_shapes)}
        return build_plan(self.cost_model, self.lengths, [self.shapes[s] for s in group_shapes], assign,
                          status=status, note=note, bucket_cost_ratio=bucket_cost_ratio, caps=caps, calls=calls)


def split_calls(lengths: np.ndarray, members: Sequence[int], cap: int) -> list[list[int]]:
    """``members`` cut into packed calls of at most ``cap`` tokens: longest first, each into the call with the
    most room left, a new call when none has room (few calls, each paying its per-call cost once). One call
    when they all fit; each list ascending."""
    members = np.asarray(members, dtype=np.int64)
    sizes = lengths[members]
    if int(sizes.sum()) <= cap:
        return [sorted(members.tolist())]
    order = np.argsort(-sizes, kind="stable")
    if members.size > 512:  # many short ones: consecutive cuts of the sorted order (next fit), in numpy
        ends = np.cumsum(sizes[order])
        calls, start, base = [], 0, 0
        while start < members.size:
            stop = max(int(np.searchsorted(ends, base + cap, side="right")), start + 1)
            calls.append(sorted(members[order[start:stop]].tolist()))
            base, start = int(ends[stop - 1]), stop
        return calls
    calls: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # max-heap of (-room, call)
    for k in order.tolist():
        size = int(sizes[k])
        if rooms and -rooms[0][0] >= size:
            room, c = heapq.heappop(rooms)
            heapq.heappush(rooms, (room + size, c))
        else:
            c = len(calls)
            calls.append([])
            heapq.heappush(rooms, (size - cap, c))
        calls[c].append(int(members[k]))
    return [sorted(c) for c in calls]


def build_plan(cost_model: CostModel, lengths: np.ndarray, group_shapes: Sequence[tuple[int, str]],
               assign: np.ndarray, *, status: str, note: str, bucket_cost_ratio: float = 1.0,
               caps: dict[tuple[int, str], int] | None = None,
               calls: dict[int, list[list[int]]] | None = None) -> Plan:
    """A ``Plan``: groups placed largest first on consecutive ranks, timed by ``CostModel.group_time`` (packed).

    Placing power-of-two groups in decreasing size on consecutive ranks starts every group at a multiple of
    its size, so none straddles a node unless it is made of whole nodes (``Cluster.check_plannable``). A group
    whose sequences do not fit in one packed call (``CostModel.max_call_tokens``; ``caps`` caches it per shape)
    runs them as micro-batches (``split_calls``, or ``calls[g]`` when given for group g).
    """
    lengths = np.asarray(lengths)
    caps = {} if caps is None else caps
    ranks = placed_ranks([d for d, _ in group_shapes])
    order = sorted(range(len(group_shapes)), key=lambda g: ranks[g][0])
    members: dict[int, list[int]] = {g: [] for g in order}
    assign = np.asarray(assign)
    by_group = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[by_group], np.arange(len(group_shapes) + 1))
    for g in order:
        members[g] = by_group[bounds[g]:bounds[g + 1]].tolist()
    groups = []
    checked: dict[tuple[int, str], tuple[str | None, str | None]] = {}
    for g in order:
        degree, strategy = group_shapes[g]
        seqs = members[g]
        cap = caps.get((degree, strategy))
        if cap is None:
            cap = caps[(degree, strategy)] = cost_model.max_call_tokens(degree, strategy)
        given = None if calls is None else calls.get(g)
        group_calls = [sorted(c) for c in given] if given else (split_calls(lengths, seqs, cap) if seqs else [[]])
        micro = None if len(group_calls) == 1 else group_calls
        # CostModel.group_time with these micro-batches (the same sum), without re-checking the partition or,
        # per call, the strategy (call_time's checks, done once per shape here, cost more than the formula)
        parts = checked.get((degree, strategy))
        if parts is None:
            parts = checked[(degree, strategy)] = cost_model._check(degree, strategy)
        time = (math.fsum(cost_model._packed_time(lengths[c].astype(np.float64), degree, parts)
                          for c in group_calls) if seqs else cost_model.group_time([], degree, strategy))
        softmax, linear = cost_model.split_strategy(strategy)
        groups.append(Group(ranks[g], softmax, linear, seqs, time, micro))
    covered = sum(d for d, _ in group_shapes)
    if covered != cost_model.cluster.world_size:
        raise AssertionError(f"groups cover {covered} ranks, world is {cost_model.cluster.world_size}")
    return Plan(groups, cost_model.step_time((g.ranks, g.predicted_time_s) for g in groups), status, note,
                bucket_cost_ratio)


def placed_ranks(degrees: Sequence[int]) -> list[tuple[int, ...]]:
    """The ranks of groups of these ``degrees`` as ``build_plan`` places them: largest first on consecutive ranks
    (ties in the given order), so a power-of-two group starts at a multiple of its size."""
    order = sorted(range(len(degrees)), key=lambda g: -degrees[g])
    ranks: list[tuple[int, ...]] = [()] * len(degrees)
    start = 0
    for g in order:
        ranks[g] = tuple(range(start, start + int(degrees[g])))
        start += int(degrees[g])
    return ranks


def exact_plan(problem: Problem, *, deadline: float) -> tuple[list[int], np.ndarray, dict[int, list[list[int]]]] | None:
    """The optimal plan under the packed model, micro-batches included, by dynamic programming over subsets.

    * ``calls_s(I)``: the least time of shape s running the sequences ``I`` as packed calls that each fit in
      memory (``cap``), one after another: the call holding the lowest sequence of ``I`` plus the best of the
      rest (one call whenever it fits, as a call never costs more than two: every term is subadditive).
    * ``f(mask, r)``: the least makespan running exactly ``mask`` on groups of at most ``r`` ranks in all; a
      group takes the lowest sequence of ``mask`` and any subset of the rest, on its best shape of a
      power-of-two degree ``<= r``. Any multiset of power-of-two sizes summing to at most the world places
      node-aligned (``build_plan``), so ranks are the only coupling between groups.

    Returns ``(group shapes, assignment, calls)``, ``calls[g]`` the micro-batches of group g when it needs
    more than one; None when ``deadline`` passes first. Cost ``3^n (shapes + world * degrees)`` steps, for
    ``n <= EXACT_MAX_SEQUENCES``.
    """
    n, world = problem.n, problem.world
    cm, lengths = problem.cost_model, problem.lengths
    full = (1 << n) - 1
    tokens = [0] * (full + 1)
    for mask in range(1, full + 1):
        low = (mask & -mask).bit_length() - 1
        tokens[mask] = tokens[mask & (mask - 1)] + int(lengths[low])
    members = [[i for i in range(n) if mask >> i & 1] for mask in range(full + 1)]
    # best[s][mask] = (least time of shape s on mask, the call holding mask's lowest sequence)
    best: list[list[tuple[float, int]]] = []
    for s, (d, name) in enumerate(problem.shapes):
        table = [(0.0, 0)] * (full + 1)
        call = [math.inf] * (full + 1)
        for mask in range(1, full + 1):
            if tokens[mask] <= problem.cap[s]:
                # each call is timed in full (~0.1 ms): 8 sequences on 8 shapes took 0.26 s, past tiny budgets
                if clock.now() > deadline:
                    return None
                call[mask] = cm.call_time(lengths[members[mask]].tolist(), d, name)
        for mask in range(1, full + 1):
            if clock.now() > deadline:
                return None
            if call[mask] < math.inf:  # one call fits: never beaten by splitting (subadditive)
                table[mask] = (call[mask], mask)
                continue
            low = mask & -mask
            rest = mask ^ low
            value, arg = math.inf, 0
            sub = rest
            while True:
                first = sub | low
                if call[first] < math.inf and first != mask:
                    v = call[first] + table[mask ^ first][0]
                    if v < value:
                        value, arg = v, first
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            table[mask] = (value, arg)
        best.append(table)
    degrees = sorted(set(problem.degrees.tolist()))
    by_degree = {d: [s for s, (dd, _) in enumerate(problem.shapes) if dd == d] for d in degrees}
    group = {d: [min(((best[s][m][0], s) for s in by_degree[d]), default=(math.inf, -1)) for m in range(full + 1)]
             for d in degrees}

    f = {(0, r): (0.0, None) for r in range(world + 1)}
    for mask in range(1, full + 1):
        if clock.now() > deadline:
            return None
        low = mask & -mask
        rest = mask ^ low
        for r in range(1, world + 1):
            value, arg = math.inf, None
            sub = rest
            while True:
                g = sub | low
                for d in degrees:
                    if d > r:
                        break
                    cost, s = group[d][g]
                    if cost < value:
                        v = max(cost, f.get((mask ^ g, r - d), (math.inf, None))[0])
                        if v < value:
                            value, arg = v, (g, d, s)
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            f[(mask, r)] = (value, arg)
    if not math.isfinite(f[(full, world)][0]):
        return None
    group_shapes: list[int] = []
    assign = np.empty(n, dtype=np.int64)
    calls: dict[int, list[list[int]]] = {}
    mask, r = full, world
    while mask:
        g, d, s = f[(mask, r)][1]
        k = len(group_shapes)
        assign[members[g]] = k
        parts, left = [], g
        while left:
            first = best[s][left][1]
            parts.append(members[first])
            left ^= first
        if len(parts) > 1:
            calls[k] = parts
        group_shapes.append(s)
        mask, r = mask ^ g, r - d
    used = sum(problem.shapes[s][0] for s in group_shapes)
    return group_shapes + [0] * (world - used), assign, calls


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
