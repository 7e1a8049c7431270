"""Measured, not modelled: seqpar-train --strategy auto against the static strategies on this CPU.

4 local gloo ranks, llama-tiny. Each configuration is one seqpar-train run (``train``) on 4 rank processes started
once for the whole benchmark (``seqpar.launch.ranks.WorkerPool``: no rank start-up in any run). Runs are
interleaved: round r runs every mix x configuration once, each mix's configurations starting at configuration r, so
a drifting load favours none. Every run of a mix trains on the same batches (``--seed 1``), step for step.

A run's score is its throughput: the tokens of every step after its first ``WARMUP_STEPS`` (step 1 plans inline
and warms the kernels, step 2 is the first planned ahead) over the seconds those steps took, which is what a
training job gets. (Until this version the score was the median of the steps' tokens/s; that weighs a 0.7 s step
with a 4096-token sequence like a 0.3 s step of short ones, and it is on the long steps that the right layout
matters most.) A configuration's score is the median over rounds; on 2 shared cores a whole round can run 25%
slower than the next, so auto is also compared with each static configuration round by round (the median of the
per-round ratios: a slow round slows both) and step by step (``paired``: the median over every round and timed
step of the static run's seconds over auto's for the same batch). The pooled median of the steps' tokens/s, the
old score, is printed beside. ``auto`` is what a user gets with ``--strategy auto --calibrate``: the calibration
is profiled once per mix (the synthetic profile, then every static plan timed on the mix's first 6 batches:
``shape_scales``), before the timed rounds, and read from its cache file in every run; each step's plan is made
while the step before trains, in a planning process of its own, with a budget of 5% of that step on the CPU.

Static baselines, every degree a static run can have: ring and ulysses at degree 4 (every sequence on all 4
ranks), ``ring_x2`` and ``ulysses_x2`` at degree 2 (``--dp 2``: 2 data-parallel replicas of 2-rank SP groups) and
``degree1`` (``--dp 4``: 4 replicas, every sequence on one rank); replicas get sequences balanced by tokens.
TokenRing is left out: in every earlier run it measured 0.52-0.88 of the best static on every mix, and the time
goes to more rounds instead.

Three batch mixes:
* ``longtail`` (--tokens-per-step 8192 --max-len 4096, the issue's run): 11-16 sequences, one of up to 4096
  tokens in some steps; which static degree is best changes from step to step (degree 1 or 2 without a 4096-token
  sequence, degree 2 with one), and auto plans each step;
* ``short`` (--tokens-per-step 4096 --max-len 256): every sequence short, so degree 4 is the wrong degree and
  groups of one rank (no communication) win; auto plans four degree-1 groups, the layout of ``degree1``;
* ``bimodal`` (--data bimodal --tokens-per-step 8192 --max-len 2048): one 2048-token sequence and ~6K tokens of
  16-128-token ones: ONE static degree is wrong for part of the batch (degree 1 leaves the long sequence to one
  rank, degree 2 and 4 pay communication on every short one), so auto (the long one with some short ones on 2
  ranks, the other short ones on the other 2 at degree 1) should beat every static strategy.

On this CPU 4 ranks share 2 cores: the planner scores a plan by the step time under fair sharing of the cores
(``Cluster.cores_per_node``, ``CostModel.step_time``): a group's ranks speed up once other groups are done.

The machine's 2 cores are shared with other jobs: the load average is recorded per round, and only side-by-side
ratios (interleaved) are meaningful.

    python bench/train_auto.py                 # 6 rounds of 12 steps: ~20 min on 2 idle cores
    python bench/train_auto.py --overhead      # the auto path's own cost on the short mix (below), ~4 min
    python bench/train_auto.py --pool results/train_auto*.json   # pool the rounds of several runs

``--overhead``: CPU seconds (all 4 ranks and rank 0's planning process) and wall seconds per step of ``degree1``,
``auto`` and ``auto`` with the fixed 5 s plan-ahead budget it had before issue 16's fix, on the ``short`` mix, where
auto runs degree1's layout: any difference is the auto path's own cost. Each is the difference between a 10-step
and a 2-step run (start-up and warm-up cancel), interleaved rounds, medians -> results/train_auto_overhead.json.
CPU seconds barely depend on the load from other jobs; wall seconds do.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seqpar.launch.ranks import WorkerPool  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLD = 4
WARMUP_STEPS = 2  # left out of every run's tokens/s
MIXES = {"longtail": ["--data", "longtail", "--tokens-per-step", "8192", "--max-len", "4096"],
         "short": ["--data", "longtail", "--tokens-per-step", "4096", "--max-len", "256"],
         "bimodal": ["--data", "bimodal", "--tokens-per-step", "8192", "--max-len", "2048"]}
STRATEGIES = ("ring", "ulysses", "ring_x2", "ulysses_x2", "degree1", "auto")
STATIC_ARGS = {"ring_x2": ["--strategy", "ring", "--dp", "2"],  # degree 2 = 2 replicas of 2-rank SP groups
               "ulysses_x2": ["--strategy", "ulysses", "--dp", "2"],
               "degree1": ["--strategy", "ulysses", "--dp", "4"]}  # degree 1 = 4 replicas of one rank


def train_run(argv):
    import torch

    from seqpar.launch import train as train_mod

    torch.set_num_threads(1)
    args = train_mod.build_parser().parse_args(argv)
    train_mod.validate_args(args)
    history = train_mod.train(args)
    return [(h["tokens"], h["seconds"], h.get("plan", ""), h.get("plan_wait_s")) for h in history]


def throughput(steps: list[tuple[int, float]]) -> float:
    """Tokens per second of a run's timed steps, ``(tokens, seconds)`` each: its total tokens over its total time."""
    return sum(n for n, _ in steps) / sum(t for _, t in steps)


def score(results: dict, mixes: list[str], configurations: list[str]) -> list[dict]:
    """Print and return the table: per mix and configuration the median throughput over rounds, auto over each
    configuration round by round and step by step (module docstring)."""
    rows = []
    print("| mix | strategy | tokens/s (median of runs) | per round | vs best static | auto faster: per round |"
          " per step (paired) | median step tokens/s (old score) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mix in mixes:
        runs = {s: [throughput(steps) for steps in v] for s, v in results[mix].items()}
        medians = {s: statistics.median(v) for s, v in runs.items()}
        best_static = max((s for s in configurations if s != "auto"), key=medians.get)
        for s in configurations:
            per_round = [a / b for a, b in zip(runs["auto"], runs[s])]
            paired = [b_t / a_t for a_run, b_run in zip(results[mix]["auto"], results[mix][s])
                      for (_, a_t), (_, b_t) in zip(a_run, b_run)]
            old = statistics.median(n / t for steps in results[mix][s] for n, t in steps)
            rows.append({"mix": mix, "strategy": s, "tokens_per_s": medians[s], "round_throughputs": runs[s],
                         "steps": results[mix][s], "over_best_static": medians[s] / medians[best_static],
                         "best_static": best_static, "auto_over_this_per_round": per_round,
                         "auto_over_this_paired_steps": statistics.median(paired),
                         "median_step_tokens_per_s": old})
            print(f"| {mix} | {s} | {medians[s]:.0f} | {', '.join(f'{x:.0f}' for x in runs[s])} | "
                  f"{medians[s] / medians[best_static]:.3f} | median {statistics.median(per_round):.3f} "
                  f"({min(per_round):.2f}-{max(per_round):.2f}) | {statistics.median(paired):.3f} | {old:.0f} |")
    return rows


def pooled(paths: list[str]) -> None:
    """Print auto against each static configuration over the rounds of several result files (``--pool``): the
    median of the per-round throughput ratios, the rounds auto won, the median of the paired step ratios, the
    paired steps auto won and the two-sided sign test's p-value for them (the chance of a split at least this
    uneven if auto and the static run were equally fast; steps of one round share its load, so read it as a
    guide, not an exact probability)."""
    runs = [json.load(open(p)) for p in paths]
    print("| mix | auto vs | rounds | per-round median | rounds auto faster | paired steps median | its 95% interval | "
          "steps auto faster | sign test p |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mix in dict.fromkeys(m for d in runs for m in d["mixes"]):
        for s in (x for x in STRATEGIES if x != "auto"):
            per_round, paired = [], []
            for d in runs:
                rows = {(r["mix"], r["strategy"]): r["steps"] for r in d["rows"]}
                if (mix, s) not in rows:
                    continue
                auto, static = rows[(mix, "auto")], rows[(mix, s)]
                per_round += [throughput(a) / throughput(b) for a, b in zip(auto, static)]
                paired += [tb / ta for a, b in zip(auto, static) for (_, ta), (_, tb) in zip(a, b)]
            if not per_round:  # not run in these files (--strategies)
                continue
            won = sum(r > 1 for r in paired)
            print(f"| {mix} | {s} | {len(per_round)} | {statistics.median(per_round):.3f} | "
                  f"{sum(r > 1 for r in per_round)} | {statistics.median(paired):.3f} | "
                  f"{'-'.join(f'{x:.3f}' for x in median_interval(paired))} | {won} of {len(paired)} | "
                  f"{sign_test_p(won, len(paired)):.2g} |")
    room(runs)


def room(runs: list[dict]) -> None:
    """Print how much any per-step choice among the static configurations could gain: each step's seconds are
    the median over the pooled rounds of each configuration (the mixes' batches are the same in every run: seeded);
    an oracle that runs every step on its fastest static configuration against the best single static one, and
    auto against it (both as seconds summed over the timed steps, ratios above 1 meaning faster)."""
    print("| mix | best static | its seconds (sum of step medians) | per-step oracle faster by | auto faster by |")
    print("| --- | --- | --- | --- | --- |")
    for mix in dict.fromkeys(m for d in runs for m in d["mixes"]):
        steps: dict[str, list[list[float]]] = {}
        # only configurations every file ran: each step's median then comes from the same rounds for all of them
        common = set.intersection(*({r["strategy"] for r in d["rows"] if r["mix"] == mix}
                                    for d in runs if mix in d["mixes"]))
        for d in runs:
            for r in d["rows"]:
                if r["mix"] == mix and r["strategy"] in common:
                    steps.setdefault(r["strategy"], []).extend([[t for _, t in run] for run in r["steps"]])
        medians = {s: [statistics.median(col) for col in zip(*runs_of_s)] for s, runs_of_s in steps.items()}
        statics = [s for s in medians if s != "auto"]
        best = min(statics, key=lambda s: sum(medians[s]))
        oracle = sum(min(medians[s][i] for s in statics) for i in range(len(medians[best])))
        print(f"| {mix} | {best} | {sum(medians[best]):.3f} | {sum(medians[best]) / oracle:.3f} | "
              f"{sum(medians[best]) / sum(medians['auto']):.3f} |")


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the order statistics k and n + 1 - k of the sorted values, k the
    largest with P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (steps of one round share its load, so like the sign
    test it is a guide, not an exact coverage)."""
    ordered, n = sorted(values), len(values)
    k, below = 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2 ** n <= (1 - level) / 2:
        below += math.comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def sign_test_p(wins: int, n: int) -> float:
    """Two-sided exact sign test: the chance, with a fair coin per pair, of ``wins`` of ``n`` or a split as uneven."""
    tail = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(tail + 1)) / 2 ** n)


def timed_run(argv, fixed_budget_s=None):
    """CPU seconds of this rank (and of its planning process) and wall seconds of one seqpar-train run;
    ``fixed_budget_s``: every plan made
    ahead gets this budget instead of a share of the step (what auto did before issue 16's fix: 5 s)."""
    import time

    import torch

    from seqpar.launch import train as train_mod
    from seqpar.runtime import steps as steps_mod

    torch.set_num_threads(1)
    args = train_mod.build_parser().parse_args(argv)
    train_mod.validate_args(args)
    original = steps_mod.StepRunner.plan_ahead_options
    if fixed_budget_s is not None:  # a full wall-clock solve every step, as before the fix
        steps_mod.StepRunner.plan_ahead_options = lambda self: {"time_limit_s": fixed_budget_s}
    try:
        cpu, wall, children = time.process_time(), time.perf_counter(), os.times()
        train_mod.train(args)
        wall = time.perf_counter() - wall
        gc.collect()  # the run's planning process ends (its prefetcher's finalizer waits for it): its CPU counts
        done = os.times()
        planner = done.children_user + done.children_system - children.children_user - children.children_system
        return time.process_time() - cpu + planner, wall
    finally:
        steps_mod.StepRunner.plan_ahead_options = original


def overhead(pool: WorkerPool, rounds: int, calibration: str) -> None:
    """The auto path's own cost: see the module docstring (``--overhead``)."""
    configs = {"degree1": ("degree1", None), "auto": ("auto", None), "auto_fixed_5s_budget": ("auto", 5.0)}
    names = list(configs)
    few, many = 2, 10
    measured = {n: [] for n in names}
    for name in ("degree1", "auto"):  # warm the ranks (lazy imports, first kernels) before any timing
        pool.run(timed_run, (argv_for("short", configs[name][0], few, calibration),), {}, 3600)
    loads = [os.getloadavg()]
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            strategy, budget = configs[name]
            short = pool.run(timed_run, (argv_for("short", strategy, few, calibration), budget), {}, 3600)
            long = pool.run(timed_run, (argv_for("short", strategy, many, calibration), budget), {}, 3600)
            cpu = sum(a[0] - b[0] for a, b in zip(long, short)) / (many - few)
            wall = (long[0][1] - short[0][1]) / (many - few)
            measured[name].append((cpu, wall))
        loads.append(os.getloadavg())
        print(f"round {r + 1} done, load {loads[-1][0]:.1f}", flush=True)
    rows = []
    print("| configuration (short mix) | CPU s per step, 4 ranks | vs degree1 | wall s per step | vs degree1 |")
    print("| --- | --- | --- | --- | --- |")
    base_cpu = statistics.median(c for c, _ in measured["degree1"])
    base_wall = statistics.median(w for _, w in measured["degree1"])
    for name in names:
        cpu = statistics.median(c for c, _ in measured[name])
        wall = statistics.median(w for _, w in measured[name])
        rows.append({"configuration": name, "cpu_s_per_step": cpu, "wall_s_per_step": wall,
                     "cpu_over_degree1": cpu / base_cpu, "wall_over_degree1": wall / base_wall,
                     "rounds": measured[name]})
        print(f"| {name} | {cpu:.3f} | {cpu / base_cpu:.2f} | {wall:.3f} | {wall / base_wall:.2f} |")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "train_auto_overhead.json"), "w") as f:
        json.dump({"world": WORLD, "model": "llama-tiny", "mix": MIXES["short"], "steps": [few, many],
                   "rounds": rounds, "rows": rows, "load_average_per_round": loads,
                   "note": "per step = (10-step run - 2-step run) / 8; 2 CPU cores shared with other jobs"}, f,
                  indent=1)


def argv_for(mix: str, strategy: str, steps: int, calibration: str) -> list[str]:
    argv = ["--model", "llama-tiny", "--steps", str(steps), "--no-progress", "--seed", "1",
            *STATIC_ARGS.get(strategy, ["--strategy", strategy]), *MIXES[mix]]
    return argv + (["--calibrate", calibration] if strategy == "auto" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                        help="the configurations to run (auto and at least one static; fewer: more rounds in the "
                             "same time, e.g. auto against the two best static ones)")
    parser.add_argument("--out", default="train_auto.json", help="result file name under bench/results/")
    parser.add_argument("--overhead", action="store_true", help="measure the auto path's own cost instead")
    parser.add_argument("--pool", nargs="+", metavar="JSON", help="measure nothing: pool the rounds of these "
                        "result files (e.g. results/train_auto*.json) and print auto against each static")
    args = parser.parse_args()
    if args.pool:
        pooled(args.pool)
        return
    rounds = args.rounds
    configurations = [s for s in STRATEGIES if s in args.strategies]
    if "auto" not in configurations or len(configurations) < 2:
        raise SystemExit("--strategies: name auto and at least one static configuration")
    if args.steps <= WARMUP_STEPS:
        raise SystemExit(f"--steps: must exceed the {WARMUP_STEPS} warm-up steps left out of tokens/s")
    started = time.perf_counter()
    loads = [os.getloadavg()]
    # one calibration per mix: the profile, then every static plan timed on the mix's first batches
    calibrations = {mix: os.path.join(tempfile.gettempdir(), f"seqpar-bench-calibration-{mix}.json") for mix in MIXES}
    for path in calibrations.values():
        if os.path.exists(path):
            os.remove(path)
    pool = WorkerPool(WORLD, comm_timeout_s=600)
    try:
        for mix in ["short"] if args.overhead else args.mixes:  # profile once, before any timed run
            pool.run(train_run, (argv_for(mix, "auto", 1, calibrations[mix]),), {}, 3600)
        if args.overhead:
            overhead(pool, rounds, calibrations["short"])
            return
        results = {mix: {s: [] for s in configurations} for mix in args.mixes}  # per round: (tokens, seconds) per step
        plans = {mix: [] for mix in args.mixes}
        waits = {mix: [] for mix in args.mixes}
        for r in range(rounds):
            for mix in args.mixes:
                # each round starts at another configuration: a load that drifts during a round favours none
                for strategy in configurations[r % len(configurations):] + configurations[:r % len(configurations)]:
                    steps = pool.run(train_run, (argv_for(mix, strategy, args.steps, calibrations[mix]),), {},
                                     3600)[0]
                    results[mix][strategy].append([(n, t) for n, t, _, _ in steps[WARMUP_STEPS:]])
                    if strategy == "auto":
                        plans[mix] += [p for _, _, p, _ in steps]
                        waits[mix] += [w for _, _, _, w in steps[WARMUP_STEPS:] if w is not None]
            loads.append(os.getloadavg())
            print(f"round {r + 1} done, load {loads[-1][0]:.1f}", flush=True)
    finally:
        pool.close()
    rows = score(results, args.mixes, configurations)
    for mix in args.mixes:
        if waits[mix]:
            print(f"{mix}: auto waited for its prefetched plan median {statistics.median(waits[mix]) * 1e3:.1f} ms, "
                  f"max {max(waits[mix]) * 1e3:.1f} ms per step")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out), "w") as f:
        json.dump({"world": WORLD, "model": "llama-tiny", "mixes": {m: MIXES[m] for m in args.mixes},
                   "steps": args.steps, "warmup_steps_excluded": WARMUP_STEPS, "rounds": rounds, "rows": rows,
                   "auto_plans": plans, "auto_plan_wait_s": waits,
                   "calibration": {mix: json.load(open(calibrations[mix])) for mix in args.mixes},
                   "load_average_per_round": loads, "wall_s": time.perf_counter() - started,
                   "note": "2 CPU cores shared with other jobs (see the load averages); one pool of 4 ranks, runs "
                           "interleaved; a run's score is its throughput (tokens / seconds of its timed steps), a "
                           "configuration's the median over rounds"}, f, indent=1)


if __name__ == "__main__":
    main()
