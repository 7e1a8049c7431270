"""What choosing the group shape step by step can gain over the best static configuration on long-tail, and how
much of it ``--calibrate``'s rule gets, measured on this CPU.

``train_auto.py`` runs auto against the static configurations, but on 2 shared cores a whole round can run 25%
slower than the next, so a run says little about why auto is ahead or behind. This benchmark separates the two
parts of auto's choice on the long-tail mix (4 gloo ranks, llama-tiny, FSDP, ``--tokens-per-step 8192
--max-len 4096 --seed 1``, the batches ``seqpar-train`` trains on):

1. every static plan (each of the planner's 8 group shapes) is timed on each of the run's first ``--steps``
   batches, ``--rounds`` interleaved rounds (every case once per round, the order rotated), every round kept;
2. offline, for every choice of ``REPEATS`` rounds (what ``--calibrate`` times), the production rule is replayed:
   ``calibrate_static_scales`` on the least of those rounds on the first ``n`` batches (``n`` =
   ``--calibration-batches``; ``seqpar-train`` uses ``CALIBRATION_BATCHES``), then
   ``plan_step(solver="static")`` picks a shape for every evaluated batch (the batches after the largest ``n``:
   none of them was calibrated on), and the pick is scored with the mean of the OTHER rounds (noise independent
   of the calibration's).

Reported, as speed over the best static configuration a user can run (ring / ulysses at degree 4, ``--dp 2``
ring / ulysses, degree 1; chosen on the same held-out rounds): the per-step oracle (the fastest shape of every
step: all that choosing a shape can gain), the rule (median, least and most over the round choices), and the
rule without ``shape_scales`` (the synthetic profile's fit alone). Mixed plans (groups of different shapes) are
not replayed: on long-tail the planner rarely predicts them 1% ahead, and they need the runtime to time.

    python bench/static_choice.py                       # 6 rounds x 16 steps x 8 shapes: ~13 min on 2 idle cores
    python bench/static_choice.py --rounds 8 --out static_choice_2.json
    python bench/static_choice.py --replay results/static_choice.json   # measure nothing: replay its timings
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seqpar.launch.ranks import WorkerPool  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLD = 4
REPEATS = 3  # calibrated_cost_model's default: the least of 3 rounds
MIX = {"data": "longtail", "tokens_per_step": 8192, "max_len": 4096, "seed": 1}
# the static configurations of bench/train_auto.py: (degree, strategy)
STATIC = {"ring": (4, "ring"), "ulysses": (4, "ulysses"), "ring_x2": (2, "ring"), "ulysses_x2": (2, "ulysses"),
          "degree1": (1, "ulysses")}


def measure(rounds: int, steps: int) -> dict:
    """Every rank: the synthetic profile's fit and every static plan's seconds on each batch, every round."""
    import torch

    torch.set_num_threads(1)
    import seqpar
    from seqpar.launch import train
    from seqpar.launch.calibrate import _planner_shapes, _time_step, profile
    from seqpar.launch.data import make_source
    from seqpar.solver import static_plan

    model = train.build_model("llama-tiny", 1)
    vocab = model.config.vocab_size
    train.shard_model(model, torch.device("cpu"))
    sp_model = seqpar.parallelize(model, strategy="auto")
    fitted = sp_model.config.cost_model.calibrate(profile(sp_model, sp_model.config.cost_model, vocab_size=vocab))
    source = make_source(MIX["data"], vocab=vocab, tokens_per_step=MIX["tokens_per_step"], max_len=MIX["max_len"],
                         seed=MIX["seed"])
    batches = [source.next_batch() for _ in range(steps)]
    cases = [(b, degree, strategy, static_plan([int(t.numel()) for t in batch], fitted, degree, strategy))
             for b, batch in enumerate(batches) for degree, strategy in _planner_shapes(fitted)]
    times = []
    for round_ in range(rounds + 1):  # round 0 warms up
        k = round_ % len(cases)
        for b, degree, strategy, plan in cases[k:] + cases[:k]:
            seconds = _time_step(sp_model, list(batches[b]), plan, sp_model.runner.group)
            if round_:
                times.append({"round": round_, "batch": b, "degree": degree, "strategy": strategy,
                              "seconds": seconds})
        sp_model.module.zero_grad(set_to_none=True)
    return {"coefficients": asdict(fitted.coefficients), "lengths": [[int(t.numel()) for t in b] for b in batches],
            "times": times, "load_average": os.getloadavg()}


def replay(measured: dict, calibration_batches: list[int]) -> dict:
    """The oracle, the rule and the unscaled rule against the best static configuration (module docstring)."""
    from seqpar.launch import train
    from seqpar.solver import CostCoefficients, StaticPlanMeasurement, calibrate_static_scales, plan_step
    from seqpar.wrapper import default_cost_model

    base = default_cost_model(train.build_model("llama-tiny", 1), WORLD)
    base = replace(base, coefficients=CostCoefficients(**measured["coefficients"]))
    lengths = measured["lengths"]
    seconds: dict[tuple[int, int, str], dict[int, float]] = {}
    for t in measured["times"]:
        seconds.setdefault((t["batch"], t["degree"], t["strategy"]), {})[t["round"]] = t["seconds"]
    shapes = sorted({(d, s) for _, d, s in seconds})
    rounds = sorted({r for per in seconds.values() for r in per})
    evaluated = list(range(max(calibration_batches), len(lengths)))
    if not evaluated:
        raise ValueError(f"--steps {len(lengths)} leaves no batch after the {max(calibration_batches)} calibrated on")

    def picked(cost_model, b: int) -> tuple[int, str]:
        plan = plan_step(lengths[b], cost_model, solver="static", time_limit_s=30.0)
        (shape,) = {(len(g.ranks), g.softmax_strategy) for g in plan.groups}
        return shape

    unscaled = {b: picked(base, b) for b in evaluated}
    rows: dict[str, list[float]] = {"oracle": [], "unscaled": []}
    best_names = []
    for chosen_rounds in itertools.combinations(rounds, REPEATS):
        held_out = [r for r in rounds if r not in chosen_rounds]
        truth = {key: statistics.mean(per[r] for r in held_out) for key, per in seconds.items()}
        static_total = {name: sum(truth[(b, *shape)] for b in evaluated) for name, shape in STATIC.items()}
        best_name = min(static_total, key=static_total.get)
        best_names.append(best_name)
        best = static_total[best_name]
        rows["oracle"].append(best / sum(min(truth[(b, *shape)] for shape in shapes) for b in evaluated))
        rows["unscaled"].append(best / sum(truth[(b, *unscaled[b])] for b in evaluated))
        for n in calibration_batches:
            timed = [StaticPlanMeasurement(tuple(lengths[b]), d, s, min(seconds[(b, d, s)][r] for r in chosen_rounds))
                     for b in range(n) for d, s in shapes]
            scaled = calibrate_static_scales(base, timed)
            rows.setdefault(f"rule, {n} batches", []).append(
                best / sum(truth[(b, *picked(scaled, b))] for b in evaluated))
    return {"evaluated_batches": evaluated, "round_choices": len(best_names),
            "best_static": {name: best_names.count(name) for name in sorted(set(best_names))},
            "speed_over_best_static": {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                       for name, v in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--out", default="static_choice.json", help="result file name under bench/results/")
    parser.add_argument("--replay", metavar="JSON", help="measure nothing: replay the timings of this result file "
                        "with the code as it is now, and write the result back to it")
    args = parser.parse_args()
    started = time.perf_counter()
    note = ("2 CPU cores shared with other jobs; speeds are ratios of sums of per-step seconds, each step scored on "
            "rounds the calibration did not use")
    if args.replay:
        with open(args.replay) as f:
            previous = json.load(f)
        measured, args.rounds, args.steps = previous["measured"], previous["rounds"], previous["steps"]
        args.out = os.path.relpath(os.path.abspath(args.replay), RESULTS)
        note = previous.get("note", note)
    else:
        if args.rounds <= REPEATS:
            parser.error(f"--rounds: need more than the {REPEATS} a calibration takes, to score on the others")
        pool = WorkerPool(WORLD, comm_timeout_s=600)
        try:
            measured = pool.run(measure, (args.rounds, args.steps), {}, timeout=6 * 3600)[0]
        finally:
            pool.close()
        measured["wall_s"] = time.perf_counter() - started
    result = replay(measured, args.calibration_batches)
    print(f"long-tail, {len(result['evaluated_batches'])} held-out steps, {result['round_choices']} choices of "
          f"{REPEATS} calibration rounds of {args.rounds}; best static: {result['best_static']}")
    print(f"{'speed / best static':24s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for name, row in result["speed_over_best_static"].items():
        print(f"{name:24s} {row['median']:8.4f} {row['min']:8.4f} {row['max']:8.4f}")
    payload = {"mix": MIX, "world": WORLD, "rounds": args.rounds, "steps": args.steps, **result,
               "measured": measured, "note": note}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out), "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
