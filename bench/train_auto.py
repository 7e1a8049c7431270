"""Measured, not modelled: seqpar-train --strategy auto against the static strategies on this CPU.

4 local gloo ranks, llama-tiny, long-tail synthetic data. Each configuration is one seqpar-train run on fresh
ranks (``seqpar.launch.ranks.run_ranks``); runs are interleaved (round r runs every configuration once, starting
at configuration r, so a drifting load favours none) and
each configuration's score is the median over rounds of the run's median tokens/s (the first step, which
warms up, is dropped). ``auto`` is what a user gets with ``--strategy auto --calibrate`` (the calibration is
profiled once, before the timed rounds, and read from its cache file in every run; plans made a step ahead).

Static baselines: ring, ulysses and token_ring at degree 4 (every sequence on all 4 ranks) and ``degree1``
(``--dp 4``: 4 data-parallel replicas, every sequence on one rank, sequences balanced by tokens).

Two batch mixes:
* ``longtail``: --tokens-per-step 8192 --max-len 4096 (the issue's run): many short sequences and a few long
  ones, so neither one degree fits all: degree 4 pays communication on the short ones, degree 1 leaves the
  long ones' quadratic attention on one rank (a straggler);
* ``short``: --tokens-per-step 4096 --max-len 256: every sequence is short, so degree 4 is the wrong degree;
  groups of 1 (no communication) win.

The machine's 2 cores are shared with other jobs: the load average is recorded, and only side-by-side ratios
(interleaved) are meaningful.

    python bench/train_auto.py                 # 2 rounds of 5 steps: ~5 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seqpar.launch.ranks import run_ranks  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLD = 4
MIXES = {"longtail": ["--tokens-per-step", "8192", "--max-len", "4096"],
         "short": ["--tokens-per-step", "4096", "--max-len", "256"]}
STRATEGIES = ("ring", "ulysses", "token_ring", "degree1", "auto")
STATIC_ARGS = {"degree1": ["--strategy", "ulysses", "--dp", "4"]}  # degree 1 = 4 replicas of one rank


def train_run(argv):
    import torch

    from seqpar.launch import train as train_mod

    torch.set_num_threads(1)
    args = train_mod.build_parser().parse_args(argv)
    train_mod.validate_args(args)
    history = train_mod.train(args)
    return [(h["tokens_per_s"], h.get("plan", "")) for h in history]


def argv_for(mix: str, strategy: str, steps: int, calibration: str) -> list[str]:
    argv = ["--model", "llama-tiny", "--data", "longtail", "--steps", str(steps), "--no-progress", "--seed", "1",
            *STATIC_ARGS.get(strategy, ["--strategy", strategy]), *MIXES[mix]]
    return argv + (["--calibrate", calibration] if strategy == "auto" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    load = os.getloadavg()
    calibration = os.path.join(tempfile.gettempdir(), "seqpar-bench-calibration.json")
    if os.path.exists(calibration):
        os.remove(calibration)
    run_ranks(train_run, WORLD, argv_for("longtail", "auto", 1, calibration), timeout=3600)  # profile once
    results = {mix: {s: [] for s in STRATEGIES} for mix in MIXES}
    plans = {mix: [] for mix in MIXES}
    for r in range(args.rounds):
        for mix in MIXES:
            # each round starts at another configuration: a load that drifts during a round favours none
            for strategy in STRATEGIES[r % len(STRATEGIES):] + STRATEGIES[:r % len(STRATEGIES)]:
                steps = run_ranks(train_run, WORLD, argv_for(mix, strategy, args.steps, calibration), timeout=3600)[0]
                results[mix][strategy].append(statistics.median(t for t, _ in steps[1:]))
                if strategy == "auto":
                    plans[mix] += [p for _, p in steps]
        print(f"round {r + 1} done", flush=True)
    rows = []
    print("| mix | strategy | tokens/s (median over rounds) | per round | vs best static |")
    print("| --- | --- | --- | --- | --- |")
    for mix in MIXES:
        medians = {s: statistics.median(v) for s, v in results[mix].items()}
        best_static = max((s for s in STRATEGIES if s != "auto"), key=medians.get)
        for s in STRATEGIES:
            ratio = medians[s] / medians[best_static]
            rows.append({"mix": mix, "strategy": s, "tokens_per_s": medians[s], "rounds": results[mix][s],
                         "over_best_static": ratio, "best_static": best_static})
            per_round = ", ".join(f"{x:.0f}" for x in results[mix][s])
            print(f"| {mix} | {s} | {medians[s]:.0f} | {per_round} | {ratio:.2f} |")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "train_auto.json"), "w") as f:
        json.dump({"world": WORLD, "model": "llama-tiny", "mixes": MIXES, "steps": args.steps,
                   "rounds": args.rounds, "rows": rows, "auto_plans": plans,
                   "calibration": json.load(open(calibration)) if os.path.exists(calibration) else None,
                   "load_average_before": load, "load_average_after": os.getloadavg(),
                   "note": "2 CPU cores shared with other jobs; runs interleaved, medians"}, f, indent=1)


if __name__ == "__main__":
    main()
