"""Assigning sequences to fixed groups, and a greedy way to choose the groups.

* ``lpt``: longest processing time first onto the least-loaded of identical groups (Graham 1969, within
  4/3 of optimal) — the static baseline and the fill of identical groups.
* ``earliest_finish``: longest first, each sequence to the group where it would finish earliest (groups of
  different shapes: the list-scheduling rule for unrelated machines).
* ``improve``: local search on the slowest group: move one sequence out, or swap one with another group,
  whenever that lowers the slowest group without creating a new one as slow.
* ``improve_packed``: the same on the packed model itself (``CostModel.call_time``): each group's strategy
  re-picked for what it runs, then moves of the slowest group's sequences to the least-loaded group of each
  shape, and swaps with the shortest sequences of the least-loaded groups.
* ``isolate_longest`` and ``improve_step_time``: for ranks that share cores (``Cluster.cores_per_node``), where a
  group speeds up once the others are done (``CostModel.step_time``): the longest sequences alone on groups of
  their own with the rest balanced on the others, and moves of single sequences between groups while they lower
  the step time.
* ``greedy_groups``: binary search on a target makespan T; sequences, longest first, join the open group
  where they cost the fewest rank-seconds while finishing within T, or open a group of their cheapest
  shape; short ones are poured in as rank-seconds; the smallest T whose groups fit on the world wins and
  ``earliest_finish`` assigns the sequences to its groups. The fallback when there is no MILP solution,
  and a candidate (and warm start) otherwise.

Groups are given as a list of shape indices into ``Problem.shapes``; an assignment is an int array
``assign[i]`` = group of sequence i.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from seqpar.solver import clock
from seqpar.solver.problem import Problem, placed_ranks, split_calls

__all__ = ["lpt", "earliest_finish", "improve", "improve_packed", "isolate_longest", "improve_step_time",
           "greedy_groups", "fill_ranks"]


def lpt(times: np.ndarray, n_groups: int) -> np.ndarray:
    """Group of each item, longest first onto the least-loaded of ``n_groups`` identical groups.

    The longest ``max(4 n_groups, 512)`` items go one by one (a heap); the middle ones are poured in numpy: every
    group is filled up to one common level (water filling), the items, longest first, cut into consecutive runs
    of those amounts; the shortest go one by one again (as many as hold the longest poured item's size per group),
    so they even out what the pouring left. O(n log n) in numpy plus the heap steps of the longest and shortest."""
    times = np.asarray(times, dtype=np.float64)
    assign = np.zeros(times.size, dtype=np.int64)
    if n_groups == 1 or times.size == 0:
        return assign
    order = np.argsort(-times, kind="stable")
    head = min(times.size, max(4 * n_groups, 512))
    heap = [(0.0, g) for g in range(n_groups)]
    for i in order[:head].tolist():
        load, g = heap[0]
        assign[i] = g
        heapq.heapreplace(heap, (load + float(times[i]), g))
    # the shortest go last, one by one again, as many as it takes for their total to even out what pouring leaves
    # (each group may end up to one poured item off the level): the longest poured item's size per group
    if times.size <= head:
        return assign
    smallest_first = np.cumsum(times[order[::-1]])
    enough = smallest_first >= n_groups * float(times[order[head]])
    last = max(head, times.size - (int(np.argmax(enough)) + 1 if enough.any() else times.size))
    tail = order[head:last]
    if tail.size:
        _pour(times, tail, heap, assign, n_groups)
    for i in order[last:].tolist():
        load, g = heap[0]
        assign[i] = g
        heapq.heapreplace(heap, (load + float(times[i]), g))
    return assign


def _pour(times: np.ndarray, tail: np.ndarray, heap: list[tuple[float, int]], assign: np.ndarray,
          n_groups: int) -> None:
    """``lpt``'s water filling of ``tail`` (longest first) onto the groups of ``heap``, which it updates."""
    loads = np.zeros(n_groups)
    for load, g in heap:
        loads[g] = load
    by_load = np.argsort(loads, kind="stable")
    low = loads[by_load]
    total = float(times[tail].sum())
    # the level: the first k groups (least loaded) filled to (total + their loads) / k, no higher than group k+1
    k = np.arange(1, n_groups + 1)
    levels = (total + np.cumsum(low)) / k
    fits = levels <= np.append(low[1:], np.inf)
    level = float(levels[int(np.argmax(fits))])
    fill = np.maximum(level - low, 0.0)
    ends = np.cumsum(fill)
    midpoints = np.cumsum(times[tail]) - 0.5 * times[tail]
    slot = np.minimum(np.searchsorted(ends, midpoints, side="right"), n_groups - 1)
    assign[tail] = by_load[slot]
    loads += np.bincount(assign[tail], weights=times[tail], minlength=n_groups)
    heap[:] = [(float(loads[g]), g) for g in range(n_groups)]
    heapq.heapify(heap)


def earliest_finish(problem: Problem, group_shapes: list[int], *,
                    deadline: float | None = None) -> np.ndarray | None:
    """Assign longest first, each sequence to the feasible group finishing it earliest (a group starts at its
    per-call cost ``problem.const``); None if one fits nowhere or ``deadline`` passes."""
    shape_ids = sorted(set(group_shapes))
    heaps = {s: [] for s in shape_ids}
    for g, s in enumerate(group_shapes):
        heaps[s].append((float(problem.const[s]), g))
    top = problem.const[shape_ids].astype(np.float64)  # least load among each shape's groups
    times = problem.times[shape_ids]
    fits = problem.fits[shape_ids]
    assign = np.empty(problem.n, dtype=np.int64)
    for k_seq, i in enumerate(np.argsort(-problem.best_time, kind="stable").tolist()):
        if deadline is not None and k_seq % 256 == 255 and clock.now() > deadline:
            return None
        finish = np.where(fits[:, i], top + times[:, i], np.inf)
        k = int(np.argmin(finish))
        if not np.isfinite(finish[k]):
            return None
        heap = heaps[shape_ids[k]]
        _, g = heap[0]
        assign[i] = g
        heapq.heapreplace(heap, (float(finish[k]), g))
        top[k] = heap[0][0]
    return assign


def improve(problem: Problem, group_shapes: list[int], assign: np.ndarray, *,
            deadline: float | None = None, max_rounds: int = 10_000) -> np.ndarray:
    """Local search lowering the makespan: moves and swaps out of the slowest group (a new array)."""
    assign = assign.copy()
    shapes = np.asarray(group_shapes)
    cols = np.arange(problem.n)
    times, fits = problem.times, problem.fits
    loads = problem.const[shapes].astype(np.float64)  # surrogate: the per-call cost once per group
    np.add.at(loads, assign, times[shapes[assign], cols])
    for _ in range(max_rounds):
        if deadline is not None and clock.now() > deadline:
            break
        worst = int(np.argmax(loads))
        peak = loads[worst]
        tol = peak * 1e-12
        mine = np.flatnonzero(assign == worst)
        if mine.size == 0:
            break
        own = times[shapes[worst], mine]
        others = loads.copy()
        others[worst] = np.inf
        best_gain, best_move = 0.0, None
        # moves: sequence i of the worst group -> the least-loaded group of each shape
        for s in np.unique(shapes).tolist():
            candidates = np.flatnonzero(shapes == s)
            g = int(candidates[np.argmin(others[candidates])])
            if g == worst:
                continue
            new_target = loads[g] + times[s, mine]
            new_peak = np.maximum(new_target, peak - own)
            new_peak = np.where(fits[s, mine], new_peak, np.inf)
            k = int(np.argmin(new_peak))
            if peak - new_peak[k] > max(best_gain, tol):
                best_gain, best_move = peak - new_peak[k], ("move", int(mine[k]), g)
        # swaps: i of the worst group with j of any other group
        if best_move is None:
            other_seqs = np.flatnonzero(assign != worst)
            if other_seqs.size:
                g_j = assign[other_seqs]
                s_j = shapes[g_j]
                t_j_home = times[s_j, other_seqs]
                t_j_worst = np.where(fits[shapes[worst], other_seqs], times[shapes[worst], other_seqs], np.inf)
                for k, i in enumerate(mine.tolist()):
                    # one swap scan is a pass over every other sequence: check the deadline between them
                    if deadline is not None and k % 8 == 7 and clock.now() > deadline:
                        break
                    t_i_there = np.where(fits[s_j, i], times[s_j, i], np.inf)
                    new_worst = peak - own[k] + t_j_worst
                    new_other = loads[g_j] - t_j_home + t_i_there
                    new_peak = np.maximum(new_worst, new_other)
                    m = int(np.argmin(new_peak))
                    if peak - new_peak[m] > max(best_gain, tol):
                        best_gain, best_move = peak - new_peak[m], ("swap", i, int(other_seqs[m]))
        if best_move is None:
            break
        kind, i, x = best_move
        if kind == "move":
            loads[worst] -= times[shapes[worst], i]
            loads[x] += times[shapes[x], i]
            assign[i] = x
        else:
            j, g = x, int(assign[x])
            loads[worst] += times[shapes[worst], j] - times[shapes[worst], i]
            loads[g] += times[shapes[g], i] - times[shapes[g], j]
            assign[i], assign[j] = g, worst
    return assign


def improve_packed(problem: Problem, group_shapes: list[int], assign: np.ndarray, *, deadline: float,
                   tries: int = 12) -> tuple[list[int], np.ndarray] | None:
    """Local search on the PACKED makespan (a group's time: ``split_calls`` into calls that fit, each
    ``CostModel.call_time``), from ``group_shapes`` / ``assign``; ``(shapes, assign)`` (new lists) or None
    if ``deadline`` passed before anything was evaluated.

    First every used group takes the strategy, among the shapes of its degree that fit its sequences, whose
    packed time is least. Then, until no step lowers the slowest group or ``deadline`` passes: up to ``tries``
    of the slowest group's sequences (longest first) are tried on the least-loaded group of every shape
    (re-picking that group's strategy), and swapped with the shortest sequence of the least-loaded groups; the
    step that leaves the lower of the two groups' maximum wins, when it is below the slowest group's time.
    """
    lengths = problem.lengths
    shapes = list(group_shapes)
    members: list[list[int]] = [[] for _ in shapes]
    for i, g in enumerate(np.asarray(assign).tolist()):
        members[g].append(i)
    by_degree: dict[int, list[int]] = {}
    for s, (d, _) in enumerate(problem.shapes):
        by_degree.setdefault(d, []).append(s)

    checked: dict[int, tuple[str | None, str | None]] = {}

    def timed(seqs: list[int], s: int) -> float:
        return _packed_group_time(problem, seqs, s, checked)

    def best_shape(seqs: list[int], s: int) -> tuple[float, int]:
        return min((timed(seqs, t), t) for t in by_degree[problem.shapes[s][0]])

    if clock.now() > deadline:
        return None
    times = np.zeros(len(shapes))
    for g, seqs in enumerate(members):
        if clock.now() > deadline:
            return None
        times[g], shapes[g] = best_shape(seqs, shapes[g]) if seqs else (0.0, shapes[g])
    while clock.now() < deadline:
        worst = int(np.argmax(times))
        peak = float(times[worst])
        mine = sorted(members[worst], key=lambda i: -int(lengths[i]))[:tries]
        shape_arr = np.asarray(shapes)
        targets = []
        for s in set(shapes):  # the least-loaded group of every shape present
            groups = np.flatnonzero(shape_arr == s)
            g = int(groups[np.argmin(times[groups])])
            if g != worst:
                targets.append(g)
        best: tuple[float, ...] | None = None
        for i in mine:
            if clock.now() > deadline:
                break
            rest = [k for k in members[worst] if k != i]
            t_rest, s_rest = best_shape(rest, shapes[worst])
            if t_rest >= peak:
                continue
            for g in targets:
                if clock.now() > deadline:  # each target times a packed call per strategy
                    break
                t_g, s_g = best_shape(members[g] + [i], shapes[g])
                if max(t_g, t_rest) < peak * (1 - 1e-9) and (best is None or max(t_g, t_rest) < best[0]):
                    best = (max(t_g, t_rest), i, None, g, t_rest, s_rest, t_g, s_g)
                if members[g] and max(t_g, t_rest) < peak:  # swap with g's shortest
                    j = min(members[g], key=lambda k: int(lengths[k]))
                    if lengths[j] >= lengths[i]:
                        continue
                    t_w, s_w = best_shape(rest + [j], shapes[worst])
                    t_g2, s_g2 = best_shape([k for k in members[g] if k != j] + [i], shapes[g])
                    if max(t_w, t_g2) < peak * (1 - 1e-9) and (best is None or max(t_w, t_g2) < best[0]):
                        best = (max(t_w, t_g2), i, j, g, t_w, s_w, t_g2, s_g2)
        if best is None:
            break
        _, i, j, g, t_w, s_w, t_g, s_g = best
        members[worst].remove(i)
        members[g].append(i)
        if j is not None:
            members[g].remove(j)
            members[worst].append(j)
        times[worst], shapes[worst], times[g], shapes[g] = t_w, s_w, t_g, s_g
    out = np.empty(problem.n, dtype=np.int64)
    for g, seqs in enumerate(members):
        out[seqs] = g
    return shapes, out


def _packed_group_time(problem: Problem, seqs: list[int], s: int, checked: dict) -> float:
    """``CostModel.group_time`` of ``seqs`` on shape ``s`` (calls split to fit, ``split_calls``); inf when one does
    not fit. ``checked`` caches each shape's strategy check (call_time's checks cost more than its formula)."""
    cm, lengths = problem.cost_model, problem.lengths
    d, name = problem.shapes[s]
    if not seqs:  # the runtime's placeholder call
        return cm.group_time([], d, name)
    if not problem.fits[s, seqs].all():
        return np.inf
    parts = checked.get(s)
    if parts is None:
        parts = checked[s] = cm._check(d, name)
    return math.fsum(cm._packed_time(lengths[c].astype(np.float64), d, parts)
                     for c in split_calls(lengths, seqs, int(problem.cap[s])))


def isolate_longest(problem: Problem, s: int, n_groups: int, k: int) -> np.ndarray:
    """``n_groups`` groups of shape ``s``: its ``k`` longest sequences (by their time on ``s``) each alone in
    groups 0..k-1, the rest by ``lpt`` over the other groups (``k`` at most the sequences, below ``n_groups``).
    On ranks that share cores a long sequence's group gets the cores the others free when they finish, so it
    need not share its group's time with short ones."""
    times = problem.times[s]
    order = np.argsort(-times, kind="stable")
    assign = np.empty(problem.n, dtype=np.int64)
    assign[order[:k]] = np.arange(k)
    rest = order[k:]
    assign[rest] = k + lpt(times[rest], n_groups - k)
    return assign


class _GroupTimer:
    """Packed group times under moves of one sequence: each group's token total, count and ``attention_terms``
    column sums are kept, so a group with one sequence more or less is timed from its sums
    (``CostModel.packed_time_from_sums``) instead of from every member; a group whose total would pass its
    shape's one-call capacity (several calls, ``split_calls``) or become empty is timed in full
    (``_packed_group_time``)."""

    def __init__(self, problem: Problem, group_shapes: list[int], members: list[list[int]]) -> None:
        cm = problem.cost_model
        self.problem, self.shapes, self.members = problem, group_shapes, members
        self.checked: dict = {}
        self.parts = {s: cm._check(*problem.shapes[s]) for s in set(group_shapes)}
        self.packed_time = {s: cm.packed_time_function(problem.shapes[s][0], self.parts[s]) for s in self.parts}
        self.terms = {s: cm.attention_terms(problem.lengths.astype(np.float64), problem.shapes[s][0],
                                            self.parts[s]) for s in set(group_shapes)}
        self.totals = [0.0] * len(members)
        self.sums: list[np.ndarray] = [np.zeros(0)] * len(members)
        for g in range(len(members)):
            self.refresh(g)

    def refresh(self, g: int) -> None:
        """Recompute group ``g``'s sums from its members (after a move: no drift from repeated updates)."""
        seqs = self.members[g]
        self.totals[g] = float(self.problem.lengths[seqs].sum()) if seqs else 0.0
        self.sums[g] = self.terms[self.shapes[g]][seqs].sum(axis=0)

    def time(self, g: int) -> float:
        """Group ``g``'s time with its members."""
        return self._time(g, self.members[g], self.totals[g], self.sums[g])

    def time_with(self, g: int, i: int) -> float:
        """Group ``g``'s time with sequence ``i`` added."""
        return self._time(g, self.members[g] + [i], self.totals[g] + float(self.problem.lengths[i]),
                          self.sums[g] + self.terms[self.shapes[g]][i])

    def time_without(self, g: int, i: int) -> float:
        """Group ``g``'s time with its member ``i`` removed."""
        return self._time(g, [k for k in self.members[g] if k != i], self.totals[g] - float(self.problem.lengths[i]),
                          self.sums[g] - self.terms[self.shapes[g]][i])

    def _time(self, g: int, seqs: list[int], total: float, sums: np.ndarray) -> float:
        s, problem = self.shapes[g], self.problem
        if not seqs or total > problem.cap[s]:
            return _packed_group_time(problem, seqs, s, self.checked)
        return self.packed_time[s](total, len(seqs), sums.tolist(), float(problem.lengths[seqs].min()))


def greedy_step_time(problem: Problem, group_shapes: list[int], *, deadline: float) -> np.ndarray | None:
    """An assignment to groups of ``group_shapes`` for ranks that share cores: sequences longest first, each into
    the group where the step time (``CostModel.step_time``) of what is placed so far is least. On shared cores a
    group that finishes before the slowest one costs little (its cores go to the others), so this fills groups
    up to the longest one where LPT would balance them. None if ``deadline`` passes or a sequence fits nowhere."""
    cm = problem.cost_model
    ranks = placed_ranks([problem.shapes[s][0] for s in group_shapes])
    members: list[list[int]] = [[] for _ in group_shapes]
    timer = _GroupTimer(problem, list(group_shapes), members)
    times = [timer.time(g) for g in range(len(members))]
    for i in np.argsort(-problem.lengths, kind="stable").tolist():
        if clock.now() > deadline:
            return None
        best = None
        for g in range(len(members)):
            trial = list(times)
            trial[g] = timer.time_with(g, i)
            if math.isfinite(trial[g]):
                t = cm.step_time(zip(ranks, trial))
                if best is None or t < best[0]:
                    best = (t, g)
        if best is None:
            return None
        g = best[1]
        members[g].append(i)
        timer.refresh(g)
        times[g] = timer.time(g)
    out = np.empty(problem.n, dtype=np.int64)
    for g, seqs in enumerate(members):
        out[seqs] = g
    return out


def improve_step_time(problem: Problem, group_shapes: list[int], assign: np.ndarray, *, deadline: float,
                      tries: int = 12) -> np.ndarray | None:
    """Local search on the step time of ranks that share cores (``CostModel.step_time`` of the packed group times
    on the ranks ``build_plan`` gives the groups): until no move lowers it or ``deadline`` passes, up to
    ``tries`` sequences of every group (longest first) are tried on every other group and the move that lowers
    the step time most is made. The groups keep their shapes. A new assignment, or None if ``deadline`` passed
    before the groups were timed."""
    cm = problem.cost_model
    ranks = placed_ranks([problem.shapes[s][0] for s in group_shapes])
    members: list[list[int]] = [[] for _ in group_shapes]
    for i, g in enumerate(np.asarray(assign).tolist()):
        members[g].append(i)
    if clock.now() > deadline:
        return None
    timer = _GroupTimer(problem, list(group_shapes), members)
    times = []
    for g in range(len(members)):
        if clock.now() > deadline:
            return None
        times.append(timer.time(g))
    step = cm.step_time(zip(ranks, times))
    while clock.now() < deadline:
        best = None
        for a, seqs in enumerate(members):
            for i in sorted(seqs, key=lambda k: -int(problem.lengths[k]))[:tries]:
                if clock.now() > deadline:
                    break
                t_a = timer.time_without(a, i)
                for b in range(len(members)):
                    if b == a:
                        continue
                    t_b = timer.time_with(b, i)
                    trial = list(times)
                    trial[a], trial[b] = t_a, t_b
                    t = cm.step_time(zip(ranks, trial))
                    if t < step * (1 - 1e-9) and (best is None or t < best[0]):
                        best = (t, i, a, b)
        if best is None:
            break
        _, i, a, b = best
        members[a].remove(i)
        members[b].append(i)
        for g in (a, b):
            timer.refresh(g)
            times[g] = timer.time(g)
        step = cm.step_time(zip(ranks, times))
    out = np.empty(problem.n, dtype=np.int64)
    for g, seqs in enumerate(members):
        out[seqs] = g
    return out


def fill_ranks(problem: Problem, group_shapes: list[int], used_ranks: int) -> list[int]:
    """``group_shapes`` plus degree-1 groups (shape 0) on the ranks left over, so the world is covered."""
    return list(group_shapes) + [0] * (problem.world - used_ranks)


def _pack(problem: Problem, target: float, deadline: float | None = None) -> list[int] | None:
    """Group shapes meeting ``target`` on the world (sequences placed tentatively), or None if they need
    more ranks than there are.

    Each sequence may use the shapes that fit it and finish it within ``target``. Long ones (more than
    ``target / 32``), longest first, join the open group where they cost the fewest rank-seconds and still
    finish by ``target`` (the least-loaded group of each shape is the one to try), else open a group of
    their cheapest shape. Short ones are poured in afterwards as rank-seconds, costed on the shape they
    land on: into the spare time of the open groups, then into new groups. The caller assigns for real.
    """
    const = problem.const
    feasible = problem.fits & (problem.times + const[:, None] <= target)
    area = np.where(feasible, problem.times * problem.degrees[:, None], np.inf)
    choice = np.argmin(area, axis=0)
    cols = np.arange(problem.n)
    if not np.isfinite(area[choice, cols]).all():
        return None
    degrees = problem.degrees
    heaps: dict[int, list[float]] = {}
    least = np.full(len(problem.shapes), np.inf)  # least load among each shape's open groups
    ranks = 0
    own_time = problem.times[choice, cols]
    long_ones = np.flatnonzero(own_time > target / 32)
    for k, i in enumerate(long_ones[np.argsort(-own_time[long_ones], kind="stable")].tolist()):
        if deadline is not None and k % 256 == 255 and clock.now() > deadline:
            return None
        join = np.where(least + problem.times[:, i] <= target, area[:, i], np.inf)
        s = int(np.argmin(join))
        if np.isfinite(join[s]):
            heapq.heapreplace(heaps[s], least[s] + float(problem.times[s, i]))
        else:
            s = int(choice[i])
            ranks += int(degrees[s])
            if ranks > problem.world:
                return None
            heapq.heappush(heaps.setdefault(s, []), float(const[s] + problem.times[s, i]))
        least[s] = heaps[s][0]
    group_shapes = [s for s, h in heaps.items() for _ in h]
    short = np.setdiff1d(cols, long_ones, assume_unique=True)
    if short.size:
        # the short ones as one fluid: pouring a fraction f of them into shape s costs f * pour[s]
        # rank-seconds; fill the spare time of open groups, cheapest shapes first, then open new groups
        ok = feasible[:, short].all(axis=1)
        pour = np.where(ok, (problem.times[:, short] * degrees[:, None]).sum(axis=1), np.inf)
        left = 1.0
        for s in sorted(heaps, key=lambda s: pour[s]):
            if left <= 0 or not np.isfinite(pour[s]):
                continue
            spare = float(degrees[s]) * (len(heaps[s]) * target - sum(heaps[s]))
            left -= min(left, spare / pour[s])
        if left > 0:
            s = int(np.argmin(pour))
            if not np.isfinite(pour[s]):  # no single shape takes them all: each its own cheapest
                for s in np.unique(choice[short]).tolist():
                    need = float(area[s, short[choice[short] == s]].sum()) * left
                    extra = int(np.ceil(need / (degrees[s] * max(target - const[s], 1e-12 * target)) - 1e-12))
                    ranks += extra * int(degrees[s])
                    group_shapes += [s] * extra
            else:
                extra = int(np.ceil(left * pour[s] / (degrees[s] * max(target - const[s], 1e-12 * target)) - 1e-12))
                ranks += extra * int(degrees[s])
                group_shapes += [s] * extra
            if ranks > problem.world:
                return None
    return fill_ranks(problem, group_shapes, ranks)


def greedy_groups(problem: Problem, upper: float, *, iterations: int = 14,
                  deadline: float | None = None) -> tuple[list[int], np.ndarray] | None:
    """Groups and assignment from the search on the target makespan in [lower bound, ``upper``] (up from the
    bound in steps of 6% while the bracket is wider than 12%, then by bisection).

    ``_pack``'s rank-second estimates can be optimistic, so every group set it accepts is assigned for
    real (``earliest_finish``) and the fastest wins; the search stops within 0.2% or at ``deadline``.
    """
    lo, hi = problem.lower_bound(), upper
    best: tuple[float, list[int], np.ndarray] | None = None

    def consider(shapes: list[int]) -> None:
        nonlocal best
        assign = earliest_finish(problem, shapes, deadline=deadline)
        if assign is not None:
            makespan = problem.makespan(shapes, assign)
            if best is None or makespan < best[0]:
                best = (makespan, shapes, assign)

    if deadline is not None and clock.now() > deadline:
        return None
    # from the bound up (not from ``upper`` down: the caller has a plan at ``upper``, and on a loaded machine
    # the deadline may leave time for a few targets only)
    near_bound = _pack(problem, lo * 1.002, deadline)  # often met when one sequence dominates the batch
    if near_bound is not None:
        consider(near_bound)
        hi = lo
    for _ in range(iterations):
        if hi <= lo * 1.002 or (deadline is not None and clock.now() > deadline):
            break
        # gallop up from the bound while the bracket is wide: good plans sit a few percent above it, a failed
        # target is cheap (no assignment) and a deadline may cut the search after a few targets
        mid = lo * 1.06 if hi > lo * 1.12 else 0.5 * (lo + hi)
        packed = _pack(problem, mid, deadline)
        if packed is None:
            lo = mid
        else:
            hi = mid
            consider(packed)
    if best is None and not (deadline is not None and clock.now() > deadline):
        packed = _pack(problem, upper, deadline)  # every lower target failed
        if packed is not None:
            consider(packed)
    return None if best is None else (best[1], best[2])
