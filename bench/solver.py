"""Benchmark of the heterogeneity-adaptive SP planner (seqpar.solver) against static SP plans.

For each world size (8 .. 1024 H100 ranks, 8 per node) and each seed, one batch of 8 sequences per rank is
drawn from the Wikipedia-like long-tail generator (``seqpar.launch.data``, clipped to 128K tokens) and
planned for Llama-2-7B (no activation recomputation, so long sequences need several GPUs):

* planner: ``plan_step`` with its defaults (CBC, 1 s budget for the whole call);
* best static: the fastest homogeneous plan (one degree and strategy for every sequence, LPT);
* fixed for longest: the smallest degree at which the batch's longest sequence fits in memory, with the
  best strategy at that degree (how DeepSpeed-Ulysses / Megatron CP are sized);
* lower bounds: the simple one (max(slowest sequence's best time, total rank-seconds / ranks)) and the
  refined one (``makespan_lower_bound(refined=True)``).

Reported: ratios of makespans (static / planner, planner / bound) and the planner's wall time, as medians
over seeds; never a single absolute time. Writes bench/results/solver.json and bench/results/solver.png.

    python bench/solver.py            # full sweep, a couple of minutes on 2 cores
    python bench/solver.py --quick    # 8..64 ranks, 2 seeds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seqpar.launch.data import long_tail_lengths  # noqa: E402
from seqpar.solver import Cluster, CostModel, ModelSpec, makespan_lower_bound, plan_step, static_plan  # noqa: E402
from seqpar.strategies import planner_defaults  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024)
SEQS_PER_RANK = 8
MAX_LEN = 131072
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


def run_batch(world: int, seed: int) -> dict:
    cm = CostModel(Cluster.dgx_h100(world), ModelSpec.llama("2-7b"))
    lengths = long_tail_lengths(SEQS_PER_RANK * world, seed=seed, max_len=MAX_LEN).tolist()
    started = time.perf_counter()
    plan = plan_step(lengths, cm)
    plan_seconds = time.perf_counter() - started
    plan.validate(lengths, cm)
    statics = static_plans(lengths, cm)
    best_key = min(statics, key=statics.get)
    fixed_degree = min(d for d, _ in statics)
    fixed_key = min((k for k in statics if k[0] == fixed_degree), key=statics.get)
    lower = makespan_lower_bound(lengths, cm)
    refined = makespan_lower_bound(lengths, cm, refined=True)
    used = Counter(g.degree for g in plan.groups if g.seq_indices)
    return {
        "world": world, "seed": seed, "sequences": len(lengths), "longest": max(lengths),
        "tokens": sum(lengths),
        "planner_s": plan.makespan_s, "best_static_s": statics[best_key], "best_static": list(best_key),
        "fixed_longest_s": statics[fixed_key], "fixed_longest": list(fixed_key),
        "lower_bound_s": lower, "refined_lower_bound_s": refined,
        "solver_status": plan.solver_status, "chosen": plan.note.split(";")[0].removeprefix("chose "),
        "plan_wall_s": plan_seconds, "group_degrees": {str(k): v for k, v in sorted(used.items())},
    }


def summarise(runs: list[dict]) -> dict:
    med = statistics.median
    return {
        "world": runs[0]["world"], "sequences": runs[0]["sequences"], "batches": len(runs),
        "planner_s": med(r["planner_s"] for r in runs),
        "best_static_s": med(r["best_static_s"] for r in runs),
        "fixed_longest_s": med(r["fixed_longest_s"] for r in runs),
        "refined_lower_bound_s": med(r["refined_lower_bound_s"] for r in runs),
        "fixed_over_planner": med(r["fixed_longest_s"] / r["planner_s"] for r in runs),
        "best_static_over_planner": med(r["best_static_s"] / r["planner_s"] for r in runs),
        "min_best_static_over_planner": min(r["best_static_s"] / r["planner_s"] for r in runs),
        "planner_over_lower_bound": med(r["planner_s"] / r["lower_bound_s"] for r in runs),
        "max_planner_over_lower_bound": max(r["planner_s"] / r["lower_bound_s"] for r in runs),
        "planner_over_refined_bound": med(r["planner_s"] / r["refined_lower_bound_s"] for r in runs),
        "plan_wall_s_median": med(r["plan_wall_s"] for r in runs),
        "statuses": dict(Counter(r["solver_status"] for r in runs)),
        "chosen": dict(Counter(r["chosen"] for r in runs)),
    }


def print_table(rows: list[dict]) -> None:
    head = ("| ranks | seqs | fixed/plan | best static/plan (min) | plan/LB (max) | plan/refined LB "
            "| plan_step s (median) | MILP status | chosen |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(f"| {r['world']} | {r['sequences']} | {r['fixed_over_planner']:.2f} "
              f"| {r['best_static_over_planner']:.2f} ({r['min_best_static_over_planner']:.2f}) "
              f"| {r['planner_over_lower_bound']:.3f} ({r['max_planner_over_lower_bound']:.3f}) "
              f"| {r['planner_over_refined_bound']:.3f} | {r['plan_wall_s_median']:.2f} "
              f"| {_counts(r['statuses'])} | {_counts(r['chosen'])} |")


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))


def plot(rows: list[dict], path: str) -> None:
    worlds = [r["world"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in (("planner_s", "planner (plan_step)", "o-"), ("best_static_s", "best static", "s--"),
                              ("fixed_longest_s", "fixed degree for longest", "^--"),
                              ("refined_lower_bound_s", "lower bound (refined)", "k:")):
        ax.plot(worlds, [r[key] for r in rows], style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="ranks (8 sequences per rank)", ylabel="step makespan, s (median)",
           title="Llama-2-7B, long-tail batches, H100 nodes of 8")
    ax.set_xticks(worlds, [str(w) for w in worlds])
    ax.legend()
    for key, label in (("fixed_over_planner", "fixed for longest / planner"),
                       ("best_static_over_planner", "best static / planner"),
                       ("planner_over_refined_bound", "planner / refined lower bound")):
        bx.plot(worlds, [r[key] for r in rows], "o-", label=label)
    bx.axhline(1.0, color="grey", lw=0.8)
    bx.set(xscale="log", xlabel="ranks", ylabel="ratio (median over seeds)", title="speed-up and gap")
    bx.set_xticks(worlds, [str(w) for w in worlds])
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8..64 ranks, 2 seeds")
    parser.add_argument("--seeds", type=int, default=3, help="batches per world size (default 3; 64 ranks get 5)")
    args = parser.parse_args()
    worlds = WORLDS[:4] if args.quick else WORLDS
    seeds = 2 if args.quick else args.seeds
    runs, rows = [], []
    for world in worlds:
        n_seeds = max(seeds, 5) if world == 64 and not args.quick else seeds
        batch = [run_batch(world, seed) for seed in range(n_seeds)]
        runs += batch
        rows.append(summarise(batch))
        print(f"ranks {world}: done ({n_seeds} batches)", flush=True)
    print()
    print_table(rows)
    os.makedirs(RESULTS, exist_ok=True)
    config = {"model": "llama 2-7b (no recompute)", "cluster": "dgx_h100 (8 GPUs/node)",
              "seqs_per_rank": SEQS_PER_RANK, "max_len": MAX_LEN, "strategies": STRATEGIES,
              "plan_step": "defaults: cbc, time_limit_s=1.0 (whole call)", "cpu": f"{os.cpu_count()} cores (shared)"}
    with open(os.path.join(RESULTS, "solver.json"), "w") as f:
        json.dump({"config": config, "summary": rows, "runs": runs}, f, indent=1)
    plot(rows, os.path.join(RESULTS, "solver.png"))
    print(f"\nwrote {os.path.join(RESULTS, 'solver.json')} and solver.png")


if __name__ == "__main__":
    main()
