"""Benchmark of the heterogeneity-adaptive SP planner (seqpar.solver) against static SP plans, on the PACKED model.

For each world size (8 .. 1024 H100 ranks, 8 per node), each longest-sequence cap (128K, 256K tokens) and each
seed, one batch of 8 sequences per rank is drawn from the Wikipedia-like long-tail generator
(``seqpar.launch.data``) and planned for Llama-2-7B (no activation recomputation, FSDP-sharded state). Every plan
is scored by the packed cost model (a group's sequences run as one packed call, or as micro-batches when that
call would not fit in memory):

* planner: ``plan_step`` (solver "auto": HiGHS when installed) with the inline budget (1 s) and the budget it
  gets when the step is planned ahead (5 s);
* best static: the fastest homogeneous plan (one degree and strategy for every group, sequences balanced by
  tokens as a data-parallel split does: ``static_plan``);
* fixed for longest: the smallest degree at which the batch's longest sequence fits in memory, with the
  best strategy at that degree (how DeepSpeed-Ulysses / Megatron CP are sized);
* lower bound: ``makespan_lower_bound(refined=True)`` (the least makespan at which a relaxation of the step fits
  on the world: each sequence only where it fits and is fast enough, charged its compute and its unhidden
  communication, whole groups; ``Problem.refined_lower_bound``), beside the plain one (max(slowest sequence
  alone, compute rank-seconds / ranks)).

Reported: ratios of makespans (static / planner, planner / bound), the planner's wall time against its budget,
medians (and worst cases) over seeds; FlexSP (arXiv 2412.01523) reports 1.22-1.98x over static Ulysses /
Megatron CP. Writes bench/results/solver.json and bench/results/solver.png.

    python bench/solver.py            # full sweep, several minutes on 2 cores
    python bench/solver.py --quick    # 8 and 64 ranks, 2 seeds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

import matplotlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's seqpar

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seqpar.launch.data import long_tail_lengths  # noqa: E402
from seqpar.solver import Cluster, CostModel, ModelSpec, makespan_lower_bound, plan_step, static_plan  # noqa: E402
from seqpar.strategies import planner_defaults  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLDS = (8, 64, 256, 1024)
SEQS_PER_RANK = 8
MAX_LENS = (131072, 262144)
BUDGETS = (("inline", 1.0), ("ahead", 5.0))  # plan_step's default; SPModel.plan_ahead's
FLEXSP_REPORTED = "1.22-1.98x over static Ulysses / Megatron CP"
STRATEGIES = planner_defaults("softmax")  # the static baselines choose among what the planner considers


def static_plans(lengths: list[int], cm: CostModel) -> dict[tuple[int, str], float]:
    """Makespan of every homogeneous plan that fits in memory."""
    out, degree = {}, 1
    while degree <= cm.cluster.world_size:
        for name in STRATEGIES:
            try:
                out[degree, name] = static_plan(lengths, cm, degree, name).makespan_s
            except ValueError:  # does not fit, or the strategy cannot run at this degree (e.g. split the heads)
                pass
        degree *= 2
    return out


def run_batch(world: int, seed: int, max_len: int) -> list[dict]:
    cm = CostModel(Cluster.dgx_h100(world), ModelSpec.llama("2-7b"))
    lengths = long_tail_lengths(SEQS_PER_RANK * world, seed=seed, max_len=max_len).tolist()
    statics = static_plans(lengths, cm)
    best_key = min(statics, key=statics.get)
    fixed_degree = min(d for d, _ in statics)
    fixed_key = min((k for k in statics if k[0] == fixed_degree), key=statics.get)
    plain_lower = makespan_lower_bound(lengths, cm)
    lower = makespan_lower_bound(lengths, cm, refined=True)
    out = []
    for budget_name, budget in BUDGETS:
        started = time.perf_counter()
        plan = plan_step(lengths, cm, time_limit_s=budget)
        plan_seconds = time.perf_counter() - started
        plan.validate(lengths, cm)  # packed memory of every call included
        used = Counter(g.degree for g in plan.groups if g.seq_indices)
        out.append({
            "world": world, "max_len": max_len, "budget": budget_name, "budget_s": budget, "seed": seed,
            "sequences": len(lengths), "longest": max(lengths), "tokens": sum(lengths),
            "planner_s": plan.makespan_s, "best_static_s": statics[best_key], "best_static": list(best_key),
            "fixed_longest_s": statics[fixed_key], "fixed_longest": list(fixed_key), "lower_bound_s": lower,
            "plain_lower_bound_s": plain_lower,
            "solver_status": plan.solver_status, "chosen": plan.note.split(";")[0].removeprefix("chose "),
            "micro_batches": plan.num_micro_batches, "plan_wall_s": plan_seconds,
            "group_degrees": {str(k): v for k, v in sorted(used.items())},
        })
    return out


def summarise(runs: list[dict]) -> dict:
    med = statistics.median
    return {
        "world": runs[0]["world"], "max_len": runs[0]["max_len"], "budget": runs[0]["budget"],
        "budget_s": runs[0]["budget_s"], "sequences": runs[0]["sequences"], "batches": len(runs),
        "planner_s": med(r["planner_s"] for r in runs),
        "best_static_s": med(r["best_static_s"] for r in runs),
        "fixed_longest_s": med(r["fixed_longest_s"] for r in runs),
        "lower_bound_s": med(r["lower_bound_s"] for r in runs),
        "fixed_over_planner": med(r["fixed_longest_s"] / r["planner_s"] for r in runs),
        "best_static_over_planner": med(r["best_static_s"] / r["planner_s"] for r in runs),
        "min_best_static_over_planner": min(r["best_static_s"] / r["planner_s"] for r in runs),
        "planner_over_lower_bound": med(r["planner_s"] / r["lower_bound_s"] for r in runs),
        "max_planner_over_lower_bound": max(r["planner_s"] / r["lower_bound_s"] for r in runs),
        "planner_over_plain_lower_bound": med(r["planner_s"] / r["plain_lower_bound_s"] for r in runs),
        "plan_wall_s_median": med(r["plan_wall_s"] for r in runs),
        "plan_wall_s_max": max(r["plan_wall_s"] for r in runs),
        "max_micro_batches": max(r["micro_batches"] for r in runs),
        "statuses": dict(Counter(r["solver_status"] for r in runs)),
        "chosen": dict(Counter(r["chosen"] for r in runs)),
    }


def print_table(rows: list[dict]) -> None:
    head = ("| ranks | max len | budget | seqs | fixed/plan | best static/plan (min) | plan/LB (max) "
            "| plan/plain LB | wall s median (max) | micro-batches (max) | status | chosen |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(f"| {r['world']} | {r['max_len'] // 1024}K | {r['budget_s']:.0f} s | {r['sequences']} "
              f"| {r['fixed_over_planner']:.2f} "
              f"| {r['best_static_over_planner']:.3f} ({r['min_best_static_over_planner']:.3f}) "
              f"| {r['planner_over_lower_bound']:.3f} ({r['max_planner_over_lower_bound']:.3f}) "
              f"| {r['planner_over_plain_lower_bound']:.3f} "
              f"| {r['plan_wall_s_median']:.2f} ({r['plan_wall_s_max']:.2f}) | {r['max_micro_batches']} "
              f"| {_counts(r['statuses'])} | {_counts(r['chosen'])} |")
    print(f"FlexSP (arXiv 2412.01523) reports {FLEXSP_REPORTED}")


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))


def plot(rows: list[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for max_len in MAX_LENS:
        for budget_name, _ in BUDGETS:
            sel = [r for r in rows if r["max_len"] == max_len and r["budget"] == budget_name]
            ax.plot([r["world"] for r in sel], [r["best_static_over_planner"] for r in sel], "o-",
                    label=f"best static / planner, max {max_len // 1024}K, {budget_name}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhspan(1.22, 1.98, color="tab:green", alpha=0.1, label="FlexSP reported range")
    ax.set(xscale="log", xlabel="ranks (8 sequences per rank)", ylabel="ratio (median over seeds)",
           title="Llama-2-7B, long-tail batches, packed model")
    ax.set_xticks(WORLDS, [str(w) for w in WORLDS])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 and 64 ranks, 2 seeds")
    parser.add_argument("--seeds", type=int, default=3, help="batches per world size and cap (default 3)")
    args = parser.parse_args()
    worlds = WORLDS[:2] if args.quick else WORLDS
    seeds = 2 if args.quick else args.seeds
    load = os.getloadavg()
    runs, rows = [], []
    for world in worlds:
        for max_len in MAX_LENS:
            batch = [r for seed in range(seeds) for r in run_batch(world, seed, max_len)]
            runs += batch
            for budget_name, _ in BUDGETS:
                rows.append(summarise([r for r in batch if r["budget"] == budget_name]))
            print(f"ranks {world}, max {max_len}: done ({seeds} batches)", flush=True)
    print()
    print_table(rows)
    os.makedirs(RESULTS, exist_ok=True)
    config = {"model": "llama 2-7b (no recompute)", "cluster": "dgx_h100 (8 GPUs/node, 80 GB)",
              "cost_model": "packed calls, micro-batches where a call does not fit, FSDP-sharded state",
              "seqs_per_rank": SEQS_PER_RANK, "max_lens": MAX_LENS, "strategies": STRATEGIES,
              "budgets_s": dict(BUDGETS), "flexsp_reported": FLEXSP_REPORTED,
              "cpu": f"{os.cpu_count()} cores shared with other jobs; load average {load} before, "
                     f"{os.getloadavg()} after (wall times are inflated by the load)"}
    with open(os.path.join(RESULTS, "solver.json"), "w") as f:
        json.dump({"config": config, "summary": rows, "runs": runs}, f, indent=1)
    plot(rows, os.path.join(RESULTS, "solver.png"))
    print(f"\nwrote {os.path.join(RESULTS, 'solver.json')} and solver.png")


if __name__ == "__main__":
    main()
