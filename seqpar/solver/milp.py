"""The MILP (PuLP + CBC) that picks the groups and how many sequences of each length bucket each one runs.

The MILP works on the additive surrogate of the packed model (``problem`` docstring): a unit's load is
``const[s]`` (the packed call's fixed cost, once per used unit) plus its sequences' ``times``. Its
"optimal" is optimal on that surrogate; the planner re-scores its plan with the packed model.

Bucketing
---------
Sequences are sorted and cut into at most ``max_buckets`` buckets of consecutive lengths (more only if
needed so that all members of a bucket fit on the same group shapes). In unit loads each bucket is
costed as its LONGEST member, so bucketed loads never understate true loads (pools, below, use the mean
plus the bucket's spread, which never understates either).
The cuts minimise the total overstatement
``sum_i t1(max of i's bucket) - t1(l_i)`` (``t1``: degree-1 time) by dynamic programming; with at most
``max_buckets`` distinct lengths every length has its own bucket and the model is exact.

Formulation
-----------
With ``R0 = max(1, world // SLOTS)``, groups of degree ``>= R0`` are *units*: ``min(world // c,
n_sequences)`` slots of each power-of-two size ``c`` from ``R0`` to ``world``, each either unused or one SP
group of one shape. Groups of degree ``< R0`` form *pools*, one per shape: ``m[s]`` (an integer the MILP
chooses) groups of shape s sharing ``p[s, b]`` sequences of each bucket. For ``world <= SLOTS`` (``R0 = 1``)
there are no pools.

Variables: ``z[u, s]`` binary (unit u is a group of shape s), ``n[u, s, b]`` and ``p[s, b]`` integers
(sequences of bucket b in unit u / in pool s), ``m[s] = sum_k 2^k beta[s, k]`` (binary digits), ``T`` the
makespan, ``y[s, b]`` binary (pool s holds a sequence of bucket b), ``over[s, b]`` binary (more than
``m[s]`` of pool s's sequences lie in buckets ``>= b``); ``W[s, k] = T beta[s, k]`` and ``q[s, b] = m[s]
over[s, b]`` linearised (upper bounds on W, lower bounds on q: each only ever pushed the other way).

    minimise   T
    s.t.       sum_s z[u, s] <= 1                                     one shape per unit
               n[u, s, b] <= N_b z[u, s]                              only in a used unit
               sum_{u, s} n[u, s, b] + sum_s p[s, b] = N_b            every sequence placed
               load[u] = sum_s const[s] z[u, s] + sum_{s, b} tmax[s, b] n[u, s, b] <= T     unit (group) load
               sum_u c_u used[u] + sum_s d_s m[s] <= world            ranks
               used[u] >= used[u+1], load[u] >= load[u+1]             same-size units in order (symmetry)
               p[s, b] <= N_b y[s, b],  (const[s] + tmax[s, b]) y[s, b] <= T,  m[s] >= y[s, b]
               sum_{c >= b} p[s, c] <= m[s] + n over[s, b]
               sum_{c >= b} area[s, c] + tmax[s, b] q[s, b] <= m[s] (T - const[s])   where over[s, b] = 1
                   area[s, c] = tmean[s, c] p[s, c] + (tmax[s, c] - tmin[s, c]) y[s, c]
               T >= lower bound

Only pairs (s, b) where the bucket fits in memory and ``tmax[s, b]`` does not exceed the warm start's
makespan ``T_ub`` get a variable; a strategy slower or equal on every bucket than another of the same
degree, and fitting no more, is dropped. CBC starts from the better (in these terms) of the best
homogeneous plan and the greedy plan (``warmStart``; HiGHS likewise, ``_WarmHiGHS``), runs single-threaded
with a wall-clock limit (what is left before the caller's deadline once the model is built) and is stopped
at the deadline whatever happens (``_DeadlineCBC``, ``_WarmHiGHS``), and stops at ``rel_gap``.
``sol_status`` (not ``status``, which PuLP reports as "Optimal" even after a time-limited stop) says
whether the solution is proven optimal.

Decoding, exact: each used unit is a group; each bucket's sequences are dealt to the units and pools that
take some (``_deal``: each part's cost is at most its count x the bucket's mean + the bucket's spread, what
``area`` charges; a unit is charged ``tmax`` per sequence, more still); pool s becomes ``m[s]`` groups, its
sequences dealt longest first to the least-loaded (``_lpt``; ``pool_charge`` proves its slowest group within
the rows above); left-over ranks become idle degree-1 groups. So the decoded plan's surrogate makespan is at
most the MILP's objective (``MilpResult.decoded_s``; tests/test_solver.py checks it with pools), and the
MILP's value of any plan it can express is an upper bound of that plan's surrogate makespan.

Bound: with R0 = 1 and a proven-optimal solve, the decoded plan's surrogate makespan is at most
``(1 + rel_gap) * bucket_cost_ratio * OPT`` (take the surrogate optimum's assignment; costing each sequence
as its bucket's longest multiplies no load by more than the ratio; buckets never straddle a memory limit, so
that assignment stays feasible). With pools the charges add the list-scheduling and dealing slack, so the
MILP proves optimality for its own (conservative) model only; the planner reports it as such.
"""

from __future__ import annotations

import heapq
import math
import os
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pulp

from seqpar.solver import clock as solver_clock
from seqpar.solver.assign import fill_ranks
from seqpar.solver.problem import Problem

__all__ = ["SLOTS", "Buckets", "make_buckets", "MilpResult", "solve_milp"]

SLOTS = 8  # unit slots of the smallest unit size; keeps the model small at any world size
_DP_CANDIDATES = 384  # bucket ends the DP considers when there are many distinct lengths


@dataclass
class Buckets:
    members: list[np.ndarray]  # sequence indices of each bucket, by ascending length
    longest: np.ndarray  # index of each bucket's longest sequence
    cost_ratio: float  # max over buckets and fitting shapes of t(longest) / t(shortest)


def make_buckets(problem: Problem, max_buckets: int) -> Buckets:
    """Cut the sorted lengths into buckets (see the module docstring)."""
    order = np.argsort(problem.lengths, kind="stable")
    lengths = problem.lengths[order]
    starts = np.flatnonzero(np.r_[True, lengths[1:] != lengths[:-1]])  # first index of each distinct length
    counts = np.diff(np.r_[starts, lengths.size])
    reps = order[starts]  # one sequence per distinct length
    # segment id changes wherever the set of shapes a length fits on changes
    sig = problem.fits[:, reps].T
    seg = np.cumsum(np.r_[0, np.any(sig[1:] != sig[:-1], axis=1)])
    n_unique = reps.size
    if n_unique <= max_buckets:
        ends = list(range(n_unique))
    else:
        ends = _dp_ends(problem.times[0, reps], counts, seg, max(max_buckets, int(seg[-1]) + 1))
    members, longest, ratio, lo = [], [], 1.0, 0
    for e in ends:
        idx = order[starts[lo]: starts[e] + counts[e]]
        members.append(idx)
        longest.append(reps[e])
        ok = problem.fits[:, reps[e]]
        ratio = max(ratio, float(np.max(problem.times[ok, reps[e]] / problem.times[ok, reps[lo]])))
        lo = e + 1
    return Buckets(members, np.array(longest), ratio)


def _dp_ends(proxy: np.ndarray, counts: np.ndarray, seg: np.ndarray, n_buckets: int) -> list[int]:
    """Last distinct-length index of each bucket, minimising the total overstatement of ``proxy``.

    ``best_k[b]``: least overstatement covering distinct lengths ``0 .. cand[b]`` with at most k buckets;
    a bucket may start at 0 or right after an earlier candidate end, and never spans two segments.
    """
    n = proxy.size
    # candidate ends: every one of the longest lengths (they cost the most), quantiles below, segment ends
    half = _DP_CANDIDATES // 2
    body = np.linspace(0, max(0, n - half - 1), half).round().astype(int)
    seg_ends = np.flatnonzero(np.r_[seg[1:] != seg[:-1], True])
    cand = np.unique(np.r_[body, np.arange(max(0, n - half), n), seg_ends, n - 1]).astype(int)
    c_prefix = np.r_[0, np.cumsum(counts)]
    q_prefix = np.r_[0.0, np.cumsum(counts * proxy)]
    starts = np.r_[0, cand + 1]  # row 0: a bucket starting at the shortest length; row a+1: after cand[a]
    end = cand[None, :]
    cost = (proxy[end] * (c_prefix[end + 1] - c_prefix[starts[:, None]])
            - (q_prefix[end + 1] - q_prefix[starts[:, None]]))
    valid = (starts[:, None] <= end) & (seg[np.minimum(starts, n - 1)][:, None] == seg[end])
    cost = np.where(valid, cost, np.inf)
    best = cost[0].copy()
    back = [np.zeros(cand.size, dtype=np.int64)]
    for _ in range(1, n_buckets):
        total = np.r_[0.0, best][:, None] + cost  # row 0 (start fresh) keeps "at most k" buckets
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(cand.size)]
        back.append(arg)
    ends, b = [], cand.size - 1
    for level in range(n_buckets - 1, -1, -1):
        ends.append(int(cand[b]))
        row = int(back[level][b])
        if row == 0:
            break
        b = row - 1
    return sorted(ends)


@dataclass
class MilpResult:
    group_shapes: list[int]
    assign: np.ndarray
    status: str  # "optimal" (proved, for the bucketed model) or "feasible"
    objective: float  # the MILP's makespan: at least the decoded plan's surrogate makespan
    note: str
    decoded_s: float  # the decoded plan's surrogate makespan (Problem.makespan)


@dataclass
class _Unit:
    size: int
    slot: int
    shapes: list[int]  # candidate shapes (all of degree ``size``)


def _undominated(problem: Problem, tb: np.ndarray, fb: np.ndarray) -> dict[int, int]:
    """Map each shape to itself or to a same-degree shape at least as fast on every bucket, fitting as many,
    with a per-call cost no higher."""
    keep: dict[int, int] = {}
    for s, (d, _) in enumerate(problem.shapes):
        keep[s] = s
        for r, (d2, _) in enumerate(problem.shapes):
            if r == s or d2 != d:
                continue
            # per-sequence times AND the per-call cost: a shape cheaper per sequence but dearer per call is not
            # dominated (it was, before the per-call cost was compared, and the MILP lost the better shape)
            const_r, const_s = float(problem.const[r]), float(problem.const[s])
            at_least_as_good = (np.all(np.where(fb[s], tb[r] <= tb[s], True)) and np.all(fb[r] >= fb[s])
                                and const_r <= const_s)
            strictly = (np.any(fb[s] & (tb[r] < tb[s])) or np.any(fb[r] > fb[s]) or const_r < const_s
                        or r < s)
            if at_least_as_good and strictly:
                keep[s] = r
                break
    for s in keep:  # follow chains to a shape that maps to itself
        while keep[keep[s]] != keep[s]:
            keep[s] = keep[keep[s]]
    return keep


class _Warm:
    """A plan (group shapes + assignment) in the MILP's terms: unit loads, and per pooled shape its group count,
    bucket counts and largest item; ``makespan`` is the plan's value in the MILP (an upper bound of its
    bucketed surrogate makespan)."""

    def __init__(self, problem: Problem, r0: int, tb: np.ndarray, tmean: np.ndarray, spread: np.ndarray,
                 bucket_of: np.ndarray, mapping: dict[int, int], group_shapes: list[int], assign: np.ndarray) -> None:
        nb = tb.shape[1]
        counts = np.zeros((len(group_shapes), nb), dtype=np.int64)
        np.add.at(counts, (assign, bucket_of), 1)
        self.units: dict[int, list[tuple[float, int, np.ndarray]]] = {}  # size -> [(load, shape, counts)]
        self.pools: dict[int, list] = {}  # small shape -> [groups, bucket counts]
        ranks = 0
        for g, s in enumerate(group_shapes):
            s = mapping[s]
            d = problem.shapes[s][0]
            if not counts[g].any():
                continue
            ranks += d
            if d >= r0:
                load = float(problem.const[s]) + float(counts[g] @ tb[s])
                self.units.setdefault(d, []).append((load, s, counts[g]))
            else:
                pool = self.pools.setdefault(s, [0, np.zeros(nb, dtype=np.int64)])
                pool[0] += 1
                pool[1] += counts[g]
        for entries in self.units.values():
            entries.sort(key=lambda e: -e[0])
        self.ranks_ok = ranks <= problem.world
        self.beyond: dict[int, np.ndarray] = {}  # pool -> buckets b with more than m sequences in buckets >= b
        peaks = [e[0] for entries in self.units.values() for e in entries]
        for s, (groups, c) in self.pools.items():
            self.beyond[s] = np.cumsum(c[::-1])[::-1] > groups
            area = c * tmean[s] + np.where(c > 0, spread[s], 0.0)
            peaks.append(pool_charge(float(problem.const[s]), area, tb[s], c, groups))
        self.makespan = max(max(peaks, default=0.0), problem.lower_bound())


def pool_charge(const: float, area: np.ndarray, longest: np.ndarray, count: np.ndarray, groups: int) -> float:
    """What the MILP charges ``groups`` pooled groups of one shape holding ``count[b]`` sequences of bucket b,
    whose times total at most ``area[b]`` (``_deal``) and are each at most ``longest[b]``.

    Dealt out longest first to the least-loaded group (``_lpt``), the slowest group either holds one sequence
    (at most ``const + longest``) or got its last one, i (bucket b, not among the ``groups`` longest), when it
    was the least loaded: below the mean of what came before i, so it ends below ``const + (the area of
    buckets >= b) / groups + longest[b]``. The charge is the largest of these bounds, so a pool never decodes
    slower than the MILP's value of it.
    """
    used = np.flatnonzero(count)
    if used.size == 0:
        return 0.0
    charge = const + float(longest[used].max())
    suffix_area = np.cumsum(area[::-1])[::-1]
    suffix_count = np.cumsum(count[::-1])[::-1]
    beyond = np.flatnonzero(suffix_count > groups)
    if beyond.size:
        charge = max(charge, const + float(np.max(suffix_area[beyond] / groups + longest[beyond])))
    return charge


def solve_milp(problem: Problem, buckets: Buckets, warm_plans: list[tuple[list[int], np.ndarray]], *,
               time_limit_s: float, rel_gap: float, solver: str, deadline: float | None = None) -> MilpResult | str:
    """Solve; a ``MilpResult``, or a string saying why there is no solution.

    ``warm_plans`` are complete plans ``(group shapes, assignment)``; the one that is best in bucketed
    terms is the warm start (and bounds which (shape, bucket) pairs get a variable). ``deadline`` is a reading
    of the planner's clock (``seqpar.solver.clock.now()``); the solver process is stopped on wall time.
    """
    nb = len(buckets.members)
    counts = np.array([m.size for m in buckets.members])
    bucket_of = np.empty(problem.n, dtype=np.int64)
    for b, m in enumerate(buckets.members):
        bucket_of[m] = b
    tb = problem.times[:, buckets.longest]  # (shapes, buckets): a bucket costs as its longest member
    fb = problem.fits[:, buckets.longest]
    # a pool's share of a bucket, dealt out evenly (_deal), costs at most its count x the bucket's mean plus the
    # bucket's spread (longest - shortest), once
    tmean = np.stack([problem.times[:, m].mean(axis=1) for m in buckets.members], axis=1)
    spread = tb - problem.times[:, [m[0] for m in buckets.members]]
    mapping = _undominated(problem, tb, fb)
    kept = sorted(set(mapping.values()))
    world, r0 = problem.world, _floor_power_of_two(max(1, problem.world // SLOTS))
    lower = problem.lower_bound()
    warms = [_Warm(problem, r0, tb, tmean, spread, bucket_of, mapping, *w) for w in warm_plans]
    warm = min((w for w in warms if w.ranks_ok), key=lambda w: w.makespan)
    t_cap = warm.makespan * (1 + 1e-9)
    allowed = fb & (tb + problem.const[:, None] <= t_cap)

    units: list[_Unit] = []
    size = r0
    while size <= world:
        shapes = [s for s in kept if problem.shapes[s][0] == size]
        if shapes:
            units += [_Unit(size, j, shapes) for j in range(min(world // size, problem.n))]
        size *= 2
    pooled = [s for s in kept if problem.shapes[s][0] < r0]

    # ---- model ---------------------------------------------------------------------------------------------
    prob = pulp.LpProblem("seqpar_plan", pulp.LpMinimize)
    T = prob.add_variable("T", lowBound=lower * (1 - 1e-9), upBound=t_cap)
    prob += T
    z, n, p, y, over = {}, {}, {}, {}, {}
    loads, used = [], []
    by_size: dict[int, list[int]] = {}
    for ui, u in enumerate(units):
        by_size.setdefault(u.size, []).append(ui)
        load_terms, zs = [], []
        for s in u.shapes:
            z[ui, s] = prob.add_variable(f"z_{ui}_{s}", cat="Binary")
            zs.append(z[ui, s])
            for b in np.flatnonzero(allowed[s]).tolist():
                var = n[ui, s, b] = prob.add_variable(f"n_{ui}_{s}_{b}", 0, int(counts[b]), cat="Integer")
                prob += var <= int(counts[b]) * z[ui, s]
                load_terms.append(float(tb[s, b]) * var)
            load_terms.append(float(problem.const[s]) * z[ui, s])  # the packed call's fixed cost, once
        prob += pulp.lpSum(zs) <= 1
        used.append(pulp.lpSum(zs))
        loads.append(pulp.lpSum(load_terms))
        prob += loads[-1] <= T
    # pools: m[s] groups of shape s (bits beta[s, k], m = sum 2^k beta) holding p[s, b] sequences of bucket b,
    # charged pool_charge: area[s, b] = mean[s, b] p[s, b] + spread[s, b] y[s, b]; for every bucket b,
    # m (T - const) >= (area of buckets >= b) + tmax[s, b] m where more than m sequences lie in buckets >= b
    # (over[s, b]; else the row is relaxed); and const + tmax <= T for every bucket it holds. Linearised: W[s, k] =
    # beta T (the solver wants W large: upper bounds suffice), q[s, b] >= m - most (1 - over) for the product
    # over m (it wants q small).
    m, W, beta, q = {}, {}, {}, {}
    for s in pooled:
        pairs = np.flatnonzero(allowed[s]).tolist()
        if not pairs:
            continue
        d = problem.shapes[s][0]
        most = min(world // d, problem.n)
        bits = beta[s] = [prob.add_variable(f"beta_{s}_{k}", cat="Binary") for k in range(most.bit_length())]
        m[s] = pulp.lpSum((1 << k) * bit for k, bit in enumerate(bits))
        prob += m[s] <= most
        for k, bit in enumerate(bits):
            W[s, k] = prob.add_variable(f"W_{s}_{k}", lowBound=0)
            prob += W[s, k] <= T
            prob += W[s, k] <= t_cap * bit
        capacity = pulp.lpSum((1 << k) * W[s, k] for k in range(len(bits))) - float(problem.const[s]) * m[s]
        areas = {}
        for b in pairs:
            p[s, b] = prob.add_variable(f"p_{s}_{b}", 0, int(counts[b]), cat="Integer")
            y[s, b] = prob.add_variable(f"y_{s}_{b}", cat="Binary")
            prob += p[s, b] <= int(counts[b]) * y[s, b]
            prob += float(tb[s, b] + problem.const[s]) * y[s, b] <= T  # its longest, alone, within T
            prob += m[s] >= y[s, b]
            areas[b] = float(tmean[s, b]) * p[s, b] + float(spread[s, b]) * y[s, b]
        for j, b in enumerate(pairs):
            over[s, b] = prob.add_variable(f"over_{s}_{b}", cat="Binary")
            prob += pulp.lpSum(p[s, c] for c in pairs[j:]) <= m[s] + problem.n * over[s, b]
            q[s, b] = prob.add_variable(f"q_{s}_{b}", lowBound=0)
            prob += q[s, b] >= m[s] - most * (1 - over[s, b])
            # binding only where over = 1 (else the bound of _lpt does not apply, nor is it needed)
            most_area = sum(float(tmean[s, c]) * int(counts[c]) + float(spread[s, c]) for c in pairs[j:])
            prob += (pulp.lpSum(areas[c] for c in pairs[j:]) + float(tb[s, b]) * q[s, b]
                     <= capacity + most_area * (1 - over[s, b]))
    for b in range(nb):
        prob += (pulp.lpSum(v for (_, _, bb), v in n.items() if bb == b)
                 + pulp.lpSum(v for (_, bb), v in p.items() if bb == b)) == int(counts[b])
    prob += (pulp.lpSum(u.size * used[ui] for ui, u in enumerate(units))
             + pulp.lpSum(problem.shapes[s][0] * m[s] for s in m)) <= world
    for members in by_size.values():  # same-size units are interchangeable: keep them in order
        for a, c in zip(members, members[1:]):
            prob += used[a] >= used[c]
            prob += loads[a] >= loads[c]

    # ---- warm values ---------------------------------------------------------------------------------------
    for var in prob.variables():
        if var is not T:
            var.setInitialValue(0)
    T.setInitialValue(warm.makespan)
    for size, entries in warm.units.items():
        for (load, s, c), ui in zip(entries, by_size[size]):
            z[ui, s].setInitialValue(1)
            for b in np.flatnonzero(c).tolist():
                n[ui, s, b].setInitialValue(int(c[b]))
    for s, (groups, c) in warm.pools.items():
        for k in range(groups.bit_length()):
            if groups >> k & 1:
                beta[s][k].setInitialValue(1)
                W[s, k].setInitialValue(warm.makespan)
        for b in np.flatnonzero(c).tolist():
            p[s, b].setInitialValue(int(c[b]))
            y[s, b].setInitialValue(1)
        for b in np.flatnonzero(warm.beyond[s]).tolist():
            if (s, b) in over:
                over[s, b].setInitialValue(1)
                q[s, b].setInitialValue(groups)

    # ---- solve ---------------------------------------------------------------------------------------------
    if deadline is not None:  # building the model took part of the budget; the solver process starts slowly
        deadline = time.perf_counter() + (deadline - solver_clock.now())  # the planner's clock -> wall time
        time_limit_s = min(time_limit_s, 0.8 * (deadline - time.perf_counter()) - 0.05)
        if time_limit_s < 0.02:
            return f"no time left for {solver} after building the model"
    started = time.perf_counter()
    # the solver must be done by the caller's deadline (or its own limit, if sooner), whatever it costs to hand
    # it the model: both backends are stopped (HiGHS) or abandoned (CBC) at that instant
    stop_at = deadline if deadline is not None else started + 1.25 * time_limit_s + 0.1
    backend = _backend(solver, time_limit_s, rel_gap, stop_at)
    if isinstance(backend, str):
        return backend
    try:
        prob.solve(backend)
    except pulp.PulpSolverError as err:
        return f"{solver} failed: {err}"
    except _Overran as err:
        return str(err)
    elapsed = time.perf_counter() - started
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "feasible"
    else:
        return f"{solver} found no solution in {time_limit_s:.2f} s ({pulp.LpSolution.get(prob.sol_status)})"
    decoded = _decode(problem, buckets, units, z, n, p, {s: int(round(pulp.value(e))) for s, e in m.items()})
    if isinstance(decoded, str):
        return f"{solver} solution unusable: {decoded}"
    objective = float(pulp.value(T))
    decoded_s = problem.makespan(*decoded)
    # exact decoding: the decoded plan's surrogate makespan never exceeds the objective (module docstring); a
    # solver reports its objective to ~8 significant digits (CBC's solution file), hence the tolerance
    within = decoded_s <= objective * (1 + 1e-7) + 1e-12
    what = ("optimal for the bucketed model" if status == "optimal" else "feasible, optimality not proved")
    note = (f"milp {what} in {elapsed:.2f} s ({len(units)} units, {len(pooled)} pooled shapes, "
            f"{len(n) + len(p)} count variables, {nb} buckets, objective {objective:.6g} s, warm start "
            f"{warm.makespan:.6g} s); decoded: surrogate makespan {decoded_s:.6g} s "
            + ("<= objective" if within else f"> objective by {decoded_s / objective - 1:.2%} (a decoding bug)"))
    return MilpResult(*decoded, status, objective, note, decoded_s)


def _floor_power_of_two(x: int) -> int:
    return 1 << (int(x).bit_length() - 1)


def _decode(problem: Problem, buckets: Buckets, units: list[_Unit], z: dict, n: dict, p: dict,
            pool_groups: dict[int, int]):
    """Groups and assignment of a solution: each used unit is a group; pool s is ``pool_groups[s]`` groups,
    its sequences dealt out longest first to the least-loaded (list scheduling: ``pool_charge`` bounds the
    slowest); any rank left over is an idle degree-1 group."""
    def count(var) -> int:
        return int(round(var.value() or 0))

    blocks: list[tuple[int, int, int, dict[int, int]]] = []  # (degree, shape, groups, bucket counts)
    ranks = 0
    for ui, u in enumerate(units):
        for s in u.shapes:
            if (z[ui, s].value() or 0) > 0.5:
                blocks.append((u.size, s, 1, {b: count(v) for (uu, ss, b), v in n.items() if uu == ui and ss == s}))
                ranks += u.size
    for s in sorted({s for s, _ in p}):
        bc = {b: count(v) for (ss, b), v in p.items() if ss == s}
        if any(bc.values()):
            if pool_groups.get(s, 0) < 1:
                return f"pool {problem.shapes[s]} holds sequences but has no group"
            blocks.append((problem.shapes[s][0], s, pool_groups[s], bc))
            ranks += problem.shapes[s][0] * pool_groups[s]
    if ranks > problem.world:
        return f"the groups use {ranks} ranks"
    members: list[list[int]] = [[] for _ in blocks]
    for b, bucket in enumerate(buckets.members):
        takers = [k for k in range(len(blocks)) if blocks[k][3].get(b, 0) > 0]
        shares = [blocks[k][3][b] for k in takers]
        if sum(shares) != bucket.size:
            return f"bucket {b}: {sum(shares)} of its {bucket.size} sequences placed"
        longest_first = bucket[np.argsort(-problem.lengths[bucket], kind="stable")]
        for k, part in zip(takers, _deal(longest_first, shares)):
            members[k] += part
    group_shapes: list[int] = []
    assign = np.full(problem.n, -1, dtype=np.int64)
    for k, (degree, s, groups, _) in enumerate(blocks):
        seqs = np.array(members[k], dtype=np.int64)
        if seqs.size:
            assign[seqs] = len(group_shapes) + _lpt(problem.times[s, seqs], groups)
        group_shapes += [s] * groups
    return fill_ranks(problem, group_shapes, ranks), assign


def _deal(longest_first: np.ndarray, shares: list[int]) -> list[list[int]]:
    """Split a bucket's sequences (longest first) into parts of the given sizes, each item to the part furthest
    behind its share (``share * k / total - taken``, k items dealt).

    Over-assignment stays below one item: before item k the deficits sum to 1 > 0, so the chosen part's is
    positive. So among the j longest, part t holds fewer than ``share_t j / total + 1`` for every j; summing by
    parts (Abel) over any cost nondecreasing in the length, part t costs less than ``share_t x mean + (longest -
    shortest)`` of the bucket, which is what the MILP charges a pool for it (``pool_charge``'s ``area``).
    """
    total = len(longest_first)
    if len(shares) == 1:
        return [longest_first.tolist()]
    taken = [0] * len(shares)
    parts: list[list[int]] = [[] for _ in shares]
    for k, item in enumerate(longest_first.tolist(), start=1):
        best, arg = -math.inf, -1
        for t, share in enumerate(shares):
            deficit = share * k / total - taken[t]
            if taken[t] < share and deficit > best:
                best, arg = deficit, t
        taken[arg] += 1
        parts[arg].append(item)
    return parts


def _lpt(times: np.ndarray, groups: int) -> np.ndarray:
    """Longest first, each to the least-loaded of ``groups`` groups (strict list scheduling, a heap), as
    ``pool_charge`` assumes (``assign.lpt`` pours the middle of long lists, which that bound does not cover)."""
    out = np.zeros(times.size, dtype=np.int64)
    heap = [(0.0, g) for g in range(groups)]
    for i in np.argsort(-times, kind="stable").tolist():
        load, g = heap[0]
        out[i] = g
        heapq.heapreplace(heap, (load + float(times[i]), g))
    return out


STALL_FRACTION = 0.15  # HiGHS stops when its best solution has not improved for this share of its time limit


class _Overran(Exception):
    """The solver could not finish by its deadline; its run was stopped and its result dropped."""


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's highspy interface, handed the variables' initial values as a starting solution (PuLP 3.3 passes
    none to highspy; without one HiGHS found no solution at all on some large instances), and interrupted at
    ``stop_at`` (a ``time.perf_counter()`` instant: the sooner of the caller's deadline and the time limit
    counted from when the model is handed over) from HiGHS's own interrupt callbacks, presolve off: with
    presolve its ``time_limit`` overshot by seconds (5.6 s against 2.6 s at 64 ranks); also interrupted once its
    best solution has not improved for ``STALL_FRACTION`` of the time limit (at least 0.3 s)."""

    stop_at = math.inf

    def callSolver(self, lp):
        import highspy

        model = lp.solverModel
        # HiGHS's presolve ignored the time limit (and the interrupts) for seconds on these models; without it
        # the limit holds and the plans were no worse in our runs
        model.setOptionValue("presolve", "off")
        columns = sorted(lp.variables(), key=lambda v: v.index)
        start = highspy.HighsSolution()
        start.col_value = [float(v.varValue or 0.0) for v in columns]
        start.value_valid = True
        model.setSolution(start)
        now = time.perf_counter()
        # handing HiGHS the model (PuLP adds rows one by one, in Python) took part of the time: stop at the
        # absolute instant, and tell HiGHS what is left so its own clock agrees
        stop_at = min(now + (self.timeLimit or 1e9), self.stop_at)
        if stop_at - now < 0.01:
            raise _Overran("highs: no time left once the model was handed over")
        model.setOptionValue("time_limit", stop_at - now)
        # a search whose best solution has not improved for a while rarely improves later (on small steps HiGHS
        # spent the whole budget closing the gap of an incumbent it never bettered): stop it, so a plan made
        # ahead does not hold the CPU the training step needs; the status says "feasible", not "optimal"
        stall_s = max(0.3, STALL_FRACTION * (self.timeLimit or 1e9))
        best = {"value": math.inf, "since": now}

        def interrupt(callback_type, message, data_out, data_in, user_data):
            if data_in is None:
                return
            t = time.perf_counter()
            value = getattr(data_out, "mip_primal_bound", math.inf) if data_out is not None else math.inf
            if value < best["value"] * (1 - 1e-9):
                best["value"], best["since"] = value, t
            if t > stop_at or t - best["since"] > stall_s:
                data_in.user_interrupt = True

        kinds = highspy.cb.HighsCallbackType
        model.setCallback(interrupt, None)
        for kind in (kinds.kCallbackMipInterrupt, kinds.kCallbackSimplexInterrupt, kinds.kCallbackIpmInterrupt):
            model.startCallback(kind)
        # HiGHS calls back between its MIP phases, and some root phases (separation rounds with conflict analysis)
        # ran 0.3-0.6 s past the limit without a call on a loaded machine: it runs in a thread (highspy releases
        # the GIL) that the planner stops waiting for at the deadline; abandoned, it stops at its next call back
        failure: list[BaseException] = []

        def run() -> None:
            try:
                pulp.HiGHS.callSolver(self, lp)
            except BaseException as err:  # handed to the caller's thread
                failure.append(err)

        worker = threading.Thread(target=run, name="seqpar-highs", daemon=True)
        worker.start()
        worker.join(timeout=max(stop_at - time.perf_counter(), 0.0) + 0.02)
        if worker.is_alive():
            stop_at = -math.inf  # read by interrupt(): stop at the next call back
            raise _Overran("highs ran past its deadline and was abandoned")
        if failure:
            raise failure[0]


class _DeadlineCBC(pulp.PULP_CBC_CMD):
    """PuLP's bundled CBC, started from the warm start, killed at ``stop_at`` (a ``time.perf_counter()``
    instant). CBC's own ``-sec`` limit is checked between its search phases and a loaded machine also delays
    its start and its reading of the model: under load it overshot the limit by half a second and more
    (bench/results/solver.json before this class), so the planner's deadline is enforced here, on the
    process; a killed run gives no solution (``_Overran``)."""

    stop_at = math.inf

    def solve_CBC(self, lp, use_mps=True):
        tmp_mps, tmp_sol, tmp_mst = self.create_tmp_files(lp.name, "mps", "sol", "mst")
        try:
            variables, var_names, con_names, _ = lp.writeMPS(tmp_mps, rename=1)
            self.writesol(tmp_mst, lp, variables, var_names, con_names)
            left = self.stop_at - time.perf_counter()
            if left < 0.02:
                raise _Overran("cbc: no time left once the model was written")
            # CBC's own limit a little before the kill, so a run that honours it still hands back its solution
            seconds = min(self.timeLimit if self.timeLimit is not None else math.inf, 0.8 * left)
            args = [self.path, tmp_mps, "-mips", tmp_mst, "-sec", f"{max(seconds, 0.01):.3f}"]
            for option in self.options + self.getOptions():
                if not option.startswith("sec "):
                    args += ["-" + option.split()[0], *option.split()[1:]]
            args += ["-solve", "-printingOptions", "all", "-solution", tmp_sol]
            with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  stdin=subprocess.DEVNULL) as proc:
                try:
                    code = proc.wait(timeout=max(self.stop_at - time.perf_counter(), 0.0))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise _Overran(f"cbc ran past its deadline (limit {seconds:.2f} s) and was stopped") from None
            if code != 0 or not os.path.exists(tmp_sol):
                raise pulp.PulpSolverError(f"cbc exited with status {code}")
            status, values, reduced, prices, slacks, sol_status = self.readsol_MPS(
                tmp_sol, lp, variables, var_names, con_names)
        finally:
            self.delete_tmp_files(tmp_mps, tmp_sol, tmp_mst)
        lp.assignVarsVals(values)
        lp.assignVarsDj(reduced)
        lp.assignConsPi(prices)
        lp.assignConsSlack(slacks, activity=True)
        lp.assignStatus(status, sol_status)
        return status


def _backend(solver: str, time_limit_s: float, rel_gap: float, stop_at: float = math.inf):
    """The PuLP solver object for ``solver``, stopped at ``stop_at`` (``time.perf_counter()``); or a string
    saying why there is none."""
    if solver == "cbc":
        # PuLP 3.3 flags PULP_CBC_CMD as going away in PuLP 4, which also stops bundling CBC; we pin
        # pulp<4 precisely to keep the bundled binary, so the warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            backend = _DeadlineCBC(msg=False, timeLimit=max(time_limit_s, 0.01), gapRel=rel_gap,
                                   warmStart=True, threads=1, timeMode="elapsed")
    elif solver == "highs":
        # highspy only: PuLP's HiGHS_CMD (a highs executable on PATH) cannot be interrupted at the deadline
        backend = _WarmHiGHS(msg=False, timeLimit=max(time_limit_s, 0.01), gapRel=rel_gap, threads=1)
    else:
        raise ValueError(f"unknown MILP solver {solver!r}")
    if not backend.available():
        return f"{solver} is not available" + (" (pip install highspy: seqpar's highs extra)"
                                               if solver == "highs" else "")
    backend.stop_at = stop_at
    return backend
