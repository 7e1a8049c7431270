"""Per-step heterogeneous SP planning (FlexSP, arXiv 2412.01523, extended).

``plan_step`` splits the world into power-of-two, node-aligned SP groups of possibly different sizes and
strategies (degree 1 allowed; for each layer kind, any of the allowed strategies of the registry,
``seqpar.strategies``, valid at the group's degree, whichever the cost model prefers) and gives every sequence
to one group, minimising the makespan under the PACKED cost model: a group runs its sequences as one packed call
(``CostModel.call_time``), or as micro-batches when that call would not fit in memory.

* Small steps (at most ``EXACT_MAX_SEQUENCES`` sequences, ``EXACT_MAX_WORLD`` ranks): ``problem.exact_plan``,
  dynamic programming over subsets, micro-batches included: optimal, and reported so.
* Otherwise it builds candidates on the additive surrogate (``problem`` docstring), re-scores each with the
  packed model (``Problem.to_plan``) and returns the fastest:

  1. every homogeneous plan (one degree and strategy for all, sequences balanced by tokens as ``static_plan``
     and a ``--dp`` run: the static plans), scored first — so the result is never slower than the fastest of
     them (``solver="static"`` stops there);
  2. the best homogeneous plan improved by local search;
  3. the greedy target-makespan plan (``assign.greedy_groups``), improved by local search;
  4. the MILP plan (``milp.solve_milp``: CBC or HiGHS, warm-started from the better of 1 and 3), its
     assignment improved by local search, and its groups re-filled from scratch (earliest finish) and improved;

  then the fastest, re-scored packed, goes through ``assign.improve_packed`` (each group's strategy re-picked
  for its packed call, moves and swaps out of the slowest group, on the packed model itself).

Ranks that share cores (``Cluster.cores_per_node``: CPU ranks outnumbering the host's cores): a plan's step time
is ``CostModel.step_time`` (a group speeds up once other groups are done), not its slowest group, which the
searches above optimise. Then the exact search's plan is one candidate among the others, every homogeneous plan
also comes with its ``ISOLATED_LONGEST`` longest sequences alone on groups of their own
(``assign.isolate_longest``), candidates are ordered and compared by step time, the winner goes through
``assign.improve_step_time`` (moves of single sequences between its groups) after the packed search, and no
status claims a proof (the lower bounds bound the slowest group).

Last, the plan found is returned only when predicted faster than the fastest static plan by more than
``min_gain`` (default the calibrated model's own error, ``CostCoefficients.plan_margin``; 0 uncalibrated): a search
over many candidates picks the ones whose predictions are most optimistic, so gains within the model's error are
mostly its error (on a shared CPU, plans predicted 3-14% faster measured 0.94-1.08 of the static plan).

``time_limit_s`` is a deadline for the whole call, read on ``clock`` (wall, or the thread's CPU time:
``seqpar.solver.clock``): every phase checks it (the homogeneous plans stop at 50% of it, their scoring at 60%, each
at least a share once the tables are built; the search at 80%; the greedy gets up to 70% of the search's time and
ends early once within 0.2%; the MILP's own limit is what is left once its model is built, less a reserve for the
re-balancing, and its solver is stopped (HiGHS, run in a thread) or killed (CBC) at that instant whatever it is
doing; HiGHS also stops when its best solution stalls), the packed re-scoring takes candidates in the surrogate's
order until 85% of it, or sooner by its measured cost per candidate (at least one; a candidate whose packed bound,
``Problem.packed_floor``, cannot beat the best so far is skipped), and the packed search runs until 98% less the
cost of re-scoring its result.
``solver_status``: ``"optimal"`` when the exact search ran or the plan meets ``Problem.lower_bound``;
``"feasible"`` when the MILP gave a solution (optimal or not on its surrogate, the note says which);
``"greedy"`` when it gave none. The note says what was proved: the MILP's outcome ("optimal for the bucketed
model" only when the solver proved it; its plan decodes within its objective, ``milp`` docstring), and how far
the returned plan is at most from the optimum (its makespan over the lower bound).

The budget is a deadline (bench/solver.py records wall time against it): the least work a call does (the
tables, one static plan, re-scoring it packed; ~0.05 s at 8192 sequences on an idle core, ~0.3 s at 100,000)
is done whatever the budget; every later phase stops at its share of the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from seqpar.solver import clock as solver_clock
from seqpar.solver.assign import (
    earliest_finish,
    greedy_groups,
    greedy_step_time,
    improve,
    improve_packed,
    improve_step_time,
    isolate_longest,
    lpt,
)
from seqpar.solver.cost_model import MAX_PLAN_MARGIN, CostModel, is_power_of_two
from seqpar.solver.milp import SLOTS, MilpResult, make_buckets, solve_milp
from seqpar.solver.plan import Plan
from seqpar.solver.problem import EXACT_MAX_SEQUENCES, EXACT_MAX_WORLD, Problem, build_plan, check_seq_lens, exact_plan

__all__ = ["plan_step", "static_plan", "makespan_lower_bound", "SOLVERS", "StaticPlanMeasurement",
           "calibrate_static_scales"]

SOLVERS = ("auto", "cbc", "highs", "greedy", "static")
ISOLATED_LONGEST = 2  # ranks that share cores: homogeneous candidates with up to this many longest sequences alone
STEP_TIME_GREEDY_GROUPS = 3  # ranks that share cores: homogeneous plans of this many groups get greedy_step_time
STEP_TIME_STARTS = 3  # ranks that share cores: the step-time search starts from this many of the best plans


def plan_step(
    seq_lens: Sequence[int],
    cost_model: CostModel,
    *,
    strategies: Sequence[str] | None = None,
    linear_strategies: Sequence[str] | None = None,
    time_limit_s: float = 1.0,
    solver: str = "auto",
    max_buckets: int = 16,
    rel_gap: float | None = None,
    min_gain: float | None = None,
    clock: str = "wall",
) -> Plan:
    """The fastest plan found for one step's sequences.

    Args:
        seq_lens: token count of every sequence of the step (positive integers).
        cost_model: the cluster, the model and the coefficients.
        strategies: softmax-layer strategies a group may use, each only at the degrees where it is valid
            (its ``min_degree``, its head divisibility). Default: ``seqpar.strategies.planner_defaults("softmax")``,
            read at each call, so a newly registered strategy is considered.
        linear_strategies: linear-attention strategies a group may use; default
            ``seqpar.strategies.planner_defaults("linear")``.
        time_limit_s: budget of the whole call, in seconds of ``clock``.
        solver: ``"auto"`` (HiGHS when ``highspy`` is installed: the ``highs`` extra; it found solutions where
            CBC found none within the budget, bench/results/solver.json; else CBC), ``"cbc"`` (bundled with
            PuLP), ``"highs"``, ``"greedy"`` (no MILP) or ``"static"`` (no search: every static plan, one degree
            and strategy for all groups as ``static_plan``, scored packed, the fastest returned; a few ms, for a
            planner beside training while planning gains nothing over them, ``StepRunner.plan_ahead_budget``).
        max_buckets: length buckets of the MILP (more buckets: closer to exact, bigger model).
        rel_gap: relative optimality gap at which the MILP stops; default 1e-9 when the formulation is
            exact (world <= ``milp.SLOTS``) and 1e-3 otherwise.
        min_gain: the fastest static plan (``static_plan``'s layout at its best degree and strategy) is returned
            unless the best plan found is predicted faster than it by more than this fraction; default the cost
            model's ``CostCoefficients.plan_margin`` (its error on its calibration profile; 0 uncalibrated), so
            the plan leaves the layout a user would run by hand only for a gain the model can tell from its error.
        clock: what ``time_limit_s`` counts: ``"wall"`` (default) wall-clock seconds, or ``"cpu"`` the CPU seconds
            of the calling thread, for a planner beside training on cores the ranks share (``seqpar.solver.clock``;
            a MILP solver's own process still stops at its wall-clock limit).

    Returns:
        A ``Plan`` that passes ``Plan.validate(seq_lens, cost_model)``; ``solver_status`` says what was proved
        (module docstring); ``note`` names the chosen candidate, the MILP's outcome and the lower bound.

    Raises:
        ValueError: empty ``seq_lens``, a non-positive or non-integer length, a sequence that does not fit
            in memory even on all ranks, a world spanning nodes whose ``gpus_per_node`` is not a power of two
            (``Cluster.check_plannable``), an unknown strategy, solver or clock, or a bad option value.
    """
    with solver_clock.reading(clock):
        return _plan_step(seq_lens, cost_model, strategies=strategies, linear_strategies=linear_strategies,
                          time_limit_s=time_limit_s, solver=solver, max_buckets=max_buckets, rel_gap=rel_gap,
                          min_gain=min_gain)


def _plan_step(seq_lens: Sequence[int], cost_model: CostModel, *, strategies: Sequence[str] | None,
               linear_strategies: Sequence[str] | None, time_limit_s: float, solver: str, max_buckets: int,
               rel_gap: float | None, min_gain: float | None) -> Plan:
    """``plan_step`` with its deadlines on the clock it set."""
    started = solver_clock.now()
    if isinstance(time_limit_s, bool) or not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
        raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise ValueError(f"max_buckets must be a positive integer, got {max_buckets!r}")
    if rel_gap is not None and not (0 <= rel_gap < 1):
        raise ValueError(f"rel_gap must be in [0, 1) or None, got {rel_gap!r}")
    if min_gain is None:
        min_gain = cost_model.coefficients.plan_margin
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be a fraction in [0, 1) or None, got {min_gain!r}")
    # every phase stops at the deadline; the final re-scoring of what was found keeps a share of the budget
    deadline = started + time_limit_s
    search_deadline = started + 0.8 * time_limit_s
    problem = Problem(seq_lens, cost_model, strategies=strategies, linear_strategies=linear_strategies)
    lower = problem.lower_bound()
    # ranks that share cores: the step time (CostModel.step_time) is not the slowest group's, which every search
    # and bound below optimises; their candidates are compared on the step time and nothing is claimed proved
    shared = cost_model.cluster.shares_cores

    def finish(plan: Plan, name: str, how: str, proved: bool) -> Plan:
        if not shared and (proved or plan.makespan_s <= lower * (1 + 1e-9)):
            plan.solver_status = "optimal"
        proof = ("optimal" if plan.solver_status == "optimal"
                 else "ranks share cores: candidates compared on the shared-core step time, no bound proved"
                 if shared else f"proved within {plan.makespan_s / lower - 1:.2%} of the optimum")
        plan.note = (f"chose {name}; {how}; lower bound {lower:.6g} s: {proof}; "
                     f"{solver_clock.now() - started:.2f} s")
        return plan

    # every shape is a static plan to re-score, built before the exact search can spend the budget (it once
    # left a long-tail batch on shared cores with Ulysses x2 alone, 4.7% slower than degree 1); past half the
    # budget the rest (the least promising) are skipped
    # (when the tables took most of a tiny budget, the static plans still get a share of it)
    homogeneous = _homogeneous(problem, deadline=max(started + (0.7 if solver == "static" else 0.5) * time_limit_s,
                                                     solver_clock.now() + 0.1 * time_limit_s))
    homogeneous.sort(key=lambda h: problem.makespan(h[1], h[2]))
    # the static plans are scored packed first, before any search can spend the budget: the fastest of them is
    # the baseline min_gain keeps (~0.2 ms each), the least promising left out past their share of the budget;
    # most promising first on the surrogate of what is compared (shared cores: the step time), so that the one a
    # starved call scores is the likeliest fastest
    stop = (deadline - 0.1 * time_limit_s if solver == "static"
            else max(started + 0.6 * time_limit_s, solver_clock.now() + 0.3 * time_limit_s))
    by_promise = sorted(homogeneous, key=lambda h: problem.step_time(h[1], h[2])) if shared else homogeneous
    statics, rescore_s = _scored_static_plans(problem, by_promise, stop=stop)
    if solver == "static":
        name, best = min(statics, key=lambda p: p[1].makespan_s)
        best.static_makespan_s = best.makespan_s
        return finish(best, name, f"solver='static': {len(statics)} of {len(problem.shapes)} group shapes scored",
                      proved=False)
    static_names = {_shape_name(problem, s) for s, _, _ in homogeneous}
    exact_note = ""
    candidates: list[tuple[str, list[int], np.ndarray]] = []
    given_calls: dict[str, dict[int, list[list[int]]]] = {}  # a candidate's micro-batches, when it fixes them
    if problem.n <= EXACT_MAX_SEQUENCES and problem.world <= EXACT_MAX_WORLD:
        found = exact_plan(problem, deadline=search_deadline if not shared else started + 0.4 * time_limit_s)
        if found is not None and not shared:
            shapes, assign, calls = found
            plan = problem.to_plan(shapes, assign, status="feasible", note="", calls=calls)
            static_name, static = min(statics, key=lambda h: h[1].makespan_s)
            plan.static_makespan_s = static.makespan_s
            if min_gain > 0 and static.makespan_s <= plan.makespan_s * (1 + min_gain):
                static.solver_status, static.static_makespan_s = "feasible", static.makespan_s
                return finish(static, static_name, _kept_static("the exact search's plan", plan.makespan_s,
                                                                static.makespan_s, min_gain),
                              proved=static.makespan_s <= plan.makespan_s * (1 + 1e-12))
            return finish(plan, "exact search", "optimal under the packed model, micro-batches included (dynamic "
                          "programming over subsets and ranks)", proved=True)
        if found is not None:  # optimal for the slowest group: one candidate among the others
            candidates.append(("exact search", found[0], found[1]))
            given_calls["exact search"] = found[2]
        else:
            exact_note = "exact search stopped at the deadline"

    # every homogeneous plan is a static_plan: all are re-scored packed (never slower than static_plan)
    candidates += [(_shape_name(problem, s), shapes, assign) for s, shapes, assign in homogeneous]
    if shared:  # the longest sequences alone, so their groups get the cores the short ones' groups free
        for s, shapes, _ in homogeneous:
            n_groups = shapes.count(s)
            for k in range(1, min(ISOLATED_LONGEST, n_groups - 1, problem.n) + 1):
                candidates.append((f"homogeneous {problem.shapes[s][1]} x{problem.shapes[s][0]}, {k} longest alone",
                                   shapes, isolate_longest(problem, s, n_groups, k)))
            # many groups: fill them by the step time itself (a few ms; 3x faster to a better plan than the
            # step-time search from the longest alone, measured on bimodal batches)
            filled = (greedy_step_time(problem, shapes, deadline=started + 0.7 * time_limit_s)
                      if n_groups >= STEP_TIME_GREEDY_GROUPS else None)
            if filled is not None:
                candidates.append((f"homogeneous {problem.shapes[s][1]} x{problem.shapes[s][0]}, step-time greedy",
                                   shapes, filled))
    best_homo = homogeneous[0]
    left = max(search_deadline - solver_clock.now(), 0.0)
    reserve = 0.05 + 0.15 * left  # to re-balance the MILP's plan
    candidates.append(("homogeneous + local search", best_homo[1],
                       improve(problem, best_homo[1], best_homo[2], deadline=_before(0.1 * left, search_deadline))))
    warm_plans = [(best_homo[1], best_homo[2])]
    # shared cores: the slowest-group searches (greedy, MILP) get less, the step-time search below the rest
    greedy = greedy_groups(problem, problem.makespan(best_homo[1], best_homo[2]),
                           deadline=_before((0.2 if shared else 0.7) * left, search_deadline))
    if greedy is not None:
        greedy_assign = improve(problem, *greedy, deadline=_before(0.05 * left, search_deadline))
        candidates.append(("greedy", greedy[0], greedy_assign))
        warm_plans.append((greedy[0], greedy_assign))

    why, bucket_ratio, milp_note, milp_found = "", 1.0, "", False
    if solver == "auto":
        solver = "highs" if _highs_available() else "cbc"
    if solver == "greedy":
        why = "solver='greedy'"
    elif shared:
        why = "ranks share cores: the MILP minimises the slowest group, not the step time; its time goes to the " \
              "step-time search"
    else:
        budget = search_deadline - solver_clock.now() - reserve
        if budget < 0.05:
            why = f"no time left for the MILP within time_limit_s={time_limit_s}"
        else:
            buckets = make_buckets(problem, max_buckets)
            bucket_ratio = buckets.cost_ratio
            gap = rel_gap if rel_gap is not None else (1e-9 if problem.world <= SLOTS else 1e-3)
            budget = search_deadline - solver_clock.now() - reserve
            result = solve_milp(problem, buckets, warm_plans, time_limit_s=max(budget, 0.02),
                                rel_gap=gap, solver=solver, deadline=search_deadline - reserve)
            if isinstance(result, MilpResult):
                milp_found, milp_note = True, result.note
                candidates.append(("milp", result.group_shapes, result.assign))
                # each re-balancing gets a share of what is left, so the packed phases keep theirs
                share = max(search_deadline - solver_clock.now(), 0.0) / 3
                candidates.append(("milp + local search", result.group_shapes,
                                   improve(problem, result.group_shapes, result.assign,
                                           deadline=_before(share, search_deadline))))
                refill = earliest_finish(problem, result.group_shapes, deadline=search_deadline)
                if refill is not None:
                    candidates.append(("milp groups re-filled", result.group_shapes,
                                       improve(problem, result.group_shapes, refill,
                                               deadline=_before(share, search_deadline))))
            else:
                why = result

    # re-score the other candidates on the packed model, most promising first (the surrogate's order), while
    # time is left
    status = "feasible" if milp_found else "greedy"
    surrogate = problem.step_time if shared else problem.makespan
    order = sorted((k for k in range(len(candidates)) if candidates[k][0] not in static_names),
                   key=lambda k: surrogate(candidates[k][1], candidates[k][2]))
    plans: list[tuple[str, Plan]] = list(statics)
    skipped = 0
    # re-scoring a candidate (Problem.to_plan) costs the same each time, and the polished plan needs one more:
    # the loop stops when one more would eat into that, measured, not guessed (on a loaded machine it is slow)
    for k in order:
        now = solver_clock.now()
        if now > deadline - 0.15 * time_limit_s or now + 2 * rescore_s > deadline - 0.02 * time_limit_s:
            break
        if shared and len(plans) - len(statics) >= 2 * STEP_TIME_STARTS:
            break  # the rest of the budget: the step-time searches
        name, shapes, assign = candidates[k]
        if plans and not shared and problem.packed_floor(shapes, assign) >= min(p.makespan_s for _, p in plans):
            skipped += 1  # cannot beat the best so far (a bound of its packed makespan, in numpy)
        else:
            plans.append((name, problem.to_plan(shapes, assign, status=status, note="",
                                                bucket_cost_ratio=bucket_ratio, calls=given_calls.get(name))))
        rescore_s = max(rescore_s, solver_clock.now() - now)  # (the first bound builds its tables: counted)
    # the fastest static plan scored: what the plan gained over it is reported (Plan.static_makespan_s)
    static_s = min(p.makespan_s for _, p in statics)
    name, best = min(plans, key=lambda p: p[1].makespan_s)  # ties keep the surrogate's best
    # the surrogate over-charges packed groups of the overlapped strategies: re-pick each group's strategy and
    # move sequences out of the slowest group on the packed model itself, while time is left (less the time
    # to re-score its result)
    winner = next(c for c in candidates if c[0] == name)
    end = deadline - 0.02 * time_limit_s - 1.5 * rescore_s
    # with shared cores the step-time search below gets half of what is left
    polished = improve_packed(problem, winner[1], winner[2],
                              deadline=(solver_clock.now() + end) / 2 if shared else end)
    if polished is not None and polished[0] == list(winner[1]) and np.array_equal(polished[1], winner[2]):
        polished = None  # nothing changed: no need to re-score it
    if polished is not None:
        plan = problem.to_plan(polished[0], polished[1], status=status, note="", bucket_cost_ratio=bucket_ratio)
        if plan.makespan_s < best.makespan_s * (1 - 1e-12):
            name, best = f"{name} + packed search", plan
            plans.insert(0, (name, plan))
            winner = (name, polished[0], polished[1])
    if shared:
        # the step time, not the slowest group: move sequences between the groups of each of the best
        # STEP_TIME_STARTS plans, best first, each search with an equal share of the time left (from the winner
        # alone the search can stop above where it ends from the runner-up)
        starts = [winner] + [next(c for c in candidates if c[0] == n) for n, _ in
                             sorted(plans, key=lambda p: p[1].makespan_s) if n != name][:STEP_TIME_STARTS - 1]
        for k, (start_name, shapes, assign) in enumerate(starts):
            now = solver_clock.now()
            stop = end - 1.5 * rescore_s
            if now >= stop:
                break
            moved = improve_step_time(problem, list(shapes), assign, deadline=now + (stop - now) / (len(starts) - k))
            if moved is not None and not np.array_equal(moved, assign):
                plan = problem.to_plan(shapes, moved, status=status, note="", bucket_cost_ratio=bucket_ratio)
                if plan.makespan_s < best.makespan_s * (1 - 1e-12):
                    name, best = f"{start_name} + step-time search", plan
                    plans.insert(0, (name, plan))
    kept = ""
    if min_gain > 0 and static_s <= best.makespan_s * (1 + min_gain):
        static_name, static_best = min(((n, p) for n, p in plans if n in static_names), key=lambda p: p[1].makespan_s)
        if static_best is not best:
            kept = _kept_static(name, best.makespan_s, static_s, min_gain)
            name, best = static_name, static_best
    best.solver_status = status
    best.static_makespan_s = static_s
    scores = ", ".join(f"{n} {p.makespan_s:.6g}" for n, p in plans[:6])
    how = "; ".join(x for x in (kept, exact_note, milp_note if milp_note else f"no MILP: {why}",
                                f"{len(plans)} of {len(candidates)} candidates re-scored packed ({skipped} "
                                f"bounded out): {scores}") if x)
    return finish(best, name, how, proved=False)


def _shape_name(problem: Problem, s: int) -> str:
    return f"homogeneous {problem.shapes[s][1]} x{problem.shapes[s][0]}"


def _scored_static_plans(problem: Problem, homogeneous: list[tuple[int, list[int], np.ndarray]], *,
                         stop: float) -> tuple[list[tuple[str, Plan]], float]:
    """``homogeneous``'s plans scored packed (``Problem.to_plan``), in order, until one more would pass ``stop``
    (at least one); and the most seconds one took."""
    scored: list[tuple[str, Plan]] = []
    most = 0.0
    for s, shapes, assign in homogeneous:
        now = solver_clock.now()
        if scored and now + most > stop:
            break
        scored.append((_shape_name(problem, s), problem.to_plan(shapes, assign, status="static", note="")))
        most = max(most, solver_clock.now() - now)
    return scored, most


def _kept_static(name: str, makespan_s: float, static_s: float, min_gain: float) -> str:
    return (f"kept the fastest static plan: {name} was predicted {static_s / makespan_s - 1:.2%} faster, not more "
            f"than min_gain={min_gain:.2%}")


def _highs_available() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def _before(seconds: float, deadline: float) -> float:
    return min(solver_clock.now() + seconds, deadline)


def _homogeneous(problem: Problem, *, deadline: float | None = None) -> list[tuple[int, list[int], np.ndarray]]:
    """Every shape on which all sequences fit, as ``(shape, group shapes, assignment)``: ``world // degree``
    groups of it, any ranks left over as idle degree-1 groups, sequences balanced by tokens (``static_plan``).
    Shapes are tried by a quick bound of their makespan (the largest of the slowest sequence and the mean load)
    and at ``deadline`` the rest are skipped (at least one is always built)."""
    usable = [s for s in range(len(problem.shapes)) if problem.fits[s].all()]
    if not usable:  # cannot happen: the full world fits every sequence, or Problem raised
        raise ValueError("no single group shape fits every sequence")

    def estimate(s: int) -> float:
        groups = problem.world // int(problem.degrees[s])
        return float(problem.const[s]) + max(float(problem.times[s].max()), float(problem.times[s].sum()) / groups)

    out = []
    tokens = problem.lengths.astype(np.float64)
    for s in sorted(usable, key=estimate):
        if out and deadline is not None and solver_clock.now() > deadline:
            break
        degree = int(problem.degrees[s])
        n_groups = problem.world // degree
        balanced_by_tokens = lpt(tokens, n_groups)
        out.append((s, [s] * n_groups + [0] * (problem.world - n_groups * degree), balanced_by_tokens))
    return out


def static_plan(seq_lens: Sequence[int], cost_model: CostModel, degree: int, strategy: str) -> Plan:
    """The baseline: ``world_size // degree`` groups of one ``degree`` and ``strategy``, the sequences balanced by
    tokens as a data-parallel split does (``seqpar-train --dp``, ``launch.data.replica_indices``): longest first to
    the group with the fewest tokens so far (ties: the lowest group, the lowest ranks). That is the layout a user
    runs by hand, and the baseline ``plan_step`` leaves only for a predicted gain above ``min_gain``: balanced by
    the model's times (quadratic attention) instead, auto's degree-1 and ring x2 layouts of long-tail steps
    measured 1-5% slower than ``--dp``'s on this CPU (bench/README.md).

    Raises:
        ValueError: bad ``seq_lens``; a world that cannot be split (see ``Cluster.check_plannable``);
            ``degree`` not a power of two no larger than the world (ranks left over stay idle); ``strategy``
            unknown or invalid at ``degree``; a sequence that does not fit in memory at this degree and strategy
            (a group whose sequences do not fit in one packed call runs them as micro-batches).
    """
    lengths = check_seq_lens(seq_lens)
    cluster = cost_model.cluster
    cluster.check_plannable()
    is_int = isinstance(degree, (int, np.integer)) and not isinstance(degree, bool)
    if not is_int or not is_power_of_two(int(degree)) or degree > cluster.world_size:
        raise ValueError(f"degree={degree!r} must be a power of two no larger than world_size={cluster.world_size}")
    mems = cost_model.seq_memories(lengths, degree, strategy)  # raises for a bad strategy
    too_big = np.flatnonzero(mems > cluster.mem_bytes)
    if too_big.size:
        i = int(too_big[0])
        raise ValueError(
            f"seq_lens[{i}]={int(lengths[i])} needs {mems[i]:.4g} bytes per rank at degree={degree} with "
            f"{strategy}, more than cluster.mem_bytes={cluster.mem_bytes:.4g}; use a larger degree"
        )
    n_groups = cluster.world_size // int(degree)
    idle = cluster.world_size - n_groups * int(degree)  # a world like 6 = 2 x 2 + 2 idle ranks at degree 2
    first = cost_model.strategy_names(1)[0]
    shapes = [(int(degree), strategy)] * n_groups + [(1, first)] * idle
    plan = build_plan(cost_model, lengths, shapes, lpt(lengths.astype(np.float64), n_groups),
                      status="static", note=f"static {strategy} x{degree}, balanced by tokens")
    plan.static_makespan_s = plan.makespan_s
    return plan


@dataclass(frozen=True)
class StaticPlanMeasurement:
    """One step of ``static_plan(lengths, cost_model, degree, strategy)`` timed on the machine: ``seconds``."""

    lengths: tuple[int, ...]
    degree: int
    strategy: str
    seconds: float

    def __post_init__(self) -> None:  # JSON gives a list: store a tuple (the dataclass stays hashable)
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"seconds must be positive and finite, got {self.seconds!r}")


def calibrate_static_scales(cost_model: CostModel, measurements: Sequence[StaticPlanMeasurement]) -> CostModel:
    """A copy whose ``shape_scales`` make its static plans take what they measured (``CostCoefficients``).

    Each measured shape's scale is the geometric mean, over its measurements, of measured seconds / the
    unscaled model's ``static_plan(...).makespan_s`` (a static plan's groups are all of that shape, so the scale
    moves its makespan by the same factor). ``plan_margin`` becomes the larger of the model's own and the RMS
    log error left on these measurements (over their count less the scales fitted, at most ``MAX_PLAN_MARGIN``):
    the model's error on the run's own batches, which is what ``plan_step``'s ``min_gain`` guards against.

    Raises:
        ValueError: no measurements, or one that ``static_plan`` refuses (its shape, its lengths).
    """
    if not measurements:
        raise ValueError("measurements is empty; time at least one static plan (profile_static_plans)")
    base = replace(cost_model, coefficients=replace(cost_model.coefficients, shape_scales=()))
    ratios: dict[tuple[str, int], list[float]] = {}
    for m in measurements:
        predicted = static_plan(list(m.lengths), base, m.degree, m.strategy).makespan_s
        ratios.setdefault((m.strategy, m.degree), []).append(math.log(m.seconds / predicted))
    scales = {shape: sum(logs) / len(logs) for shape, logs in ratios.items()}
    residuals = [r - scales[shape] for shape, logs in ratios.items() for r in logs]
    spread = math.sqrt(math.fsum(r * r for r in residuals) / max(1, len(residuals) - len(scales)))
    coefficients = replace(base.coefficients,
                           shape_scales=tuple((name, degree, math.exp(log_scale))
                                              for (name, degree), log_scale in sorted(scales.items())),
                           plan_margin=min(MAX_PLAN_MARGIN, max(base.coefficients.plan_margin, spread)))
    return replace(base, coefficients=coefficients)


def makespan_lower_bound(
    seq_lens: Sequence[int],
    cost_model: CostModel,
    *,
    strategies: Sequence[str] | None = None,
    linear_strategies: Sequence[str] | None = None,
    refined: bool = False,
) -> float:
    """No plan is faster than this.

    max(the slowest sequence's best time alone, the step's compute rank-seconds / world size), valid under the
    packed model (``Problem.lower_bound``; instant). ``refined=True``: ``Problem.refined_lower_bound``, the
    least makespan at which a relaxation fits on the world (each sequence only on shapes where it fits and is
    fast enough, charged its compute and its unhidden communication, whole groups), by bisection over small
    mixed-integer programs (HiGHS: seconds at 1024 ranks; without ``highspy`` the plain bound).

    Raises ValueError like ``plan_step``.
    """
    problem = Problem(seq_lens, cost_model, strategies=strategies, linear_strategies=linear_strategies)
    return problem.refined_lower_bound() if refined else problem.lower_bound()
