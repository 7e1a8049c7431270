"""torch.compile on a parallelized model: the first (and second) training step, eager against compiled, and the
floor no library can beat: the same model compiled WITHOUT seqpar on one process.

    python bench/compile.py [--repeats 1] [--seq-len 256] [--world-size 2] [--warm]

The tiny Llama of the tests (2 layers, hidden 64, 4 heads / 2 KV heads), one training step (forward + backward,
and ``sync_gradients`` for seqpar) on one sequence of ``--seq-len`` tokens, in six configurations:

    sp eager            parallelize(model, strategy="ring") on --world-size ranks
    sp inductor         torch.compile(sp_model)                     (the default backend a user gets)
    sp aot_eager        torch.compile(sp_model, backend="aot_eager") (Dynamo + AOTAutograd, no code generation)
    plain eager         the model alone on one process, the whole sequence (transformers' SDPA attention)
    plain inductor      torch.compile(model) on one process: the floor for "sp inductor"
    plain aot_eager     torch.compile(model, backend="aot_eager") on one process

Every measurement runs on freshly started processes, so each first step starts cold: Dynamo's in-memory caches
are empty, and each rank compiles with its own EMPTY on-disk cache directory (TORCHINDUCTOR_CACHE_DIR: Inductor's
FX graph cache and AOTAutograd's cache live there), so nothing compiled by an earlier run is reused. With
``--warm`` the two Inductor configurations are run once more on fresh processes that reuse those directories
(what a second launch of the same training job gets), reported separately as "warm".

Reported per configuration: the first and second step's wall time (the slowest rank's) and the first step's CPU
time (the busiest rank's user + system seconds, its C++ compiler runs included: Inductor compiles in-process,
``compile_threads = 1``; less sensitive to the other load on a shared machine than wall time), medians over the
repeats; the graphs Dynamo captured and its graph breaks (``torch._dynamo.utils.counters``); and whether the
compiled seqpar step's loss and gradients equal the eager seqpar step's. Writes bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import print_table, run_ranks, save_results  # noqa: E402

import seqpar  # noqa: E402

CONFIGS = ["sp eager", "sp inductor", "sp aot_eager", "plain eager", "plain inductor", "plain aot_eager"]


def _tiny_llama():
    from tests.test_parallelize import tiny_llama

    return tiny_llama()


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (Inductor's C++ compiler runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_config(config: str, seq_len: int, cache_root: str) -> dict:
    """One configuration on this process's rank (fresh processes): two timed steps, counters, loss, gradients."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    rank = dist.get_rank()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, config.replace(" ", "_"), f"rank{rank}")
    # Inductor compiles in this process (no pool of compile workers), so the CPU seconds count all of its work
    torch._inductor.config.compile_threads = 1
    counters.clear()
    kind, backend = config.split()
    model = _tiny_llama()
    ids = torch.randint(0, 96, (1, seq_len), generator=torch.Generator().manual_seed(0))
    if kind == "sp":
        sp_model = seqpar.parallelize(model, strategy="ring", verify_model=False)
        call = sp_model if backend == "eager" else torch.compile(sp_model, backend=backend)
        local = sp_model.prepare({"input_ids": ids})

        def step() -> torch.Tensor:
            loss = call(**local).loss
            loss.backward()
            sp_model.sync_gradients()
            return loss
    else:
        call = model if backend == "eager" else torch.compile(model, backend=backend)

        def step() -> torch.Tensor:
            loss = call(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return loss

    result = {}
    for name in ("first", "second"):
        dist.barrier()
        wall, cpu = time.perf_counter(), _cpu_seconds()
        loss = step()
        result[f"{name}_s"] = _max_over_ranks(time.perf_counter() - wall)
        result[f"{name}_cpu_s"] = _max_over_ranks(_cpu_seconds() - cpu)
        if name == "first":
            result["loss"] = loss.item()
            result["grads"] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    result["graphs"] = counters["stats"]["unique_graphs"]
    result["graph_breaks"] = sum(counters["graph_break"].values())
    result["break_reasons"] = [reason.splitlines()[0] for reason in counters["graph_break"]][:5]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="also run the Inductor configurations warm")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    warm: dict[str, list[dict]] = {c: [] for c in CONFIGS if c.endswith("inductor")} if args.warm else {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="seqpar-compile-bench-") as cache_root:
            for config in CONFIGS:  # the configurations alternate within a repeat: all see the same load
                world = args.world_size if config.startswith("sp") else 1
                runs[config].append(run_ranks(run_config, world, config, args.seq_len, cache_root)[0])
                print(f"{config}: first step {runs[config][-1]['first_s']:.3g} s", flush=True)
            for config in warm:
                world = args.world_size if config.startswith("sp") else 1
                warm[config].append(run_ranks(run_config, world, config, args.seq_len, cache_root)[0])

    def summary(results: list[dict]) -> dict:
        return {key: statistics.median(r[key] for r in results)
                for key in ("first_s", "second_s", "first_cpu_s", "second_cpu_s")}

    medians = {c: summary(r) for c, r in runs.items()}
    warm_medians = {c: summary(r) for c, r in warm.items()}
    eager = runs["sp eager"]
    agreement = {}
    for config in ("sp inductor", "sp aot_eager"):
        agreement[config] = {
            "loss_rel_err": max(abs(c["loss"] - e["loss"]) / abs(e["loss"]) for c, e in zip(runs[config], eager)),
            "grad_rel_err_max": max(((cg - eg).norm() / eg.norm()).item() for c, e in zip(runs[config], eager)
                                    for cg, eg in zip(c["grads"], e["grads"])),
        }
    rows = []
    for config in CONFIGS:
        last = runs[config][-1]
        rows.append({"config": config, "first step s": medians[config]["first_s"],
                     "first step cpu s": medians[config]["first_cpu_s"], "second step s": medians[config]["second_s"],
                     "graphs": last["graphs"], "graph breaks": last["graph_breaks"]})
    for config, m in warm_medians.items():
        rows.append({"config": config + " (warm)", "first step s": m["first_s"], "first step cpu s": m["first_cpu_s"],
                     "second step s": m["second_s"]})
    print_table(rows, ["config", "first step s", "first step cpu s", "second step s", "graphs", "graph breaks"])

    first = {c: m["first_s"] for c, m in medians.items()}
    ratios = {
        "sp_inductor_over_sp_eager": first["sp inductor"] / first["sp eager"],
        "plain_inductor_over_plain_eager": first["plain inductor"] / first["plain eager"],
        "sp_inductor_over_plain_inductor": first["sp inductor"] / first["plain inductor"],
        "sp_aot_eager_over_plain_aot_eager": first["sp aot_eager"] / first["plain aot_eager"],
        "sp_inductor_over_plain_inductor_cpu": medians["sp inductor"]["first_cpu_s"]
        / medians["plain inductor"]["first_cpu_s"],
    }
    target_met = ratios["sp_inductor_over_sp_eager"] <= 3.0
    print(f"first step, compiled / eager: seqpar {ratios['sp_inductor_over_sp_eager']:.0f}x, the plain model "
          f"without seqpar {ratios['plain_inductor_over_plain_eager']:.0f}x (target <= 3x: "
          f"{'met' if target_met else 'not met, and not reachable: compiling the plain model alone exceeds it'}); "
          f"seqpar compiled / plain compiled: {ratios['sp_inductor_over_plain_inductor']:.2f}x wall, "
          f"{ratios['sp_inductor_over_plain_inductor_cpu']:.2f}x cpu (aim <= 1.2x); aot_eager "
          f"{ratios['sp_aot_eager_over_plain_aot_eager']:.2f}x")
    for config, a in agreement.items():
        print(f"{config} vs sp eager: loss {a['loss_rel_err']:.1e}, gradients {a['grad_rel_err_max']:.1e}")

    save_results("compile", {
        "model": "tiny Llama (2 layers, hidden 64, 4 heads / 2 KV heads)", "strategy": "ring",
        "world_size": args.world_size, "seq_len": args.seq_len, "repeats": args.repeats,
        "configs": {c: {**medians[c], "graphs": runs[c][-1]["graphs"], "graph_breaks": runs[c][-1]["graph_breaks"],
                        "break_reasons": runs[c][-1]["break_reasons"],
                        "first_s_each": [r["first_s"] for r in runs[c]]} for c in CONFIGS},
        "warm": warm_medians,
        "ratios": ratios, "target_first_compiled_over_first_eager": 3.0, "target_met": target_met,
        "aim_sp_compiled_over_plain_compiled": 1.2,
        "compiled_vs_eager": agreement,
        "notes": "CPU, gloo; every configuration on freshly started processes with an empty Inductor / AOTAutograd "
                 "cache per rank (cold); 'warm' reuses those caches in new processes. Inductor compile_threads=1 "
                 "(in-process compilation, so CPU seconds include the C++ compiler). seqpar ranks each compile "
                 "the same graph side by side on the 2 shared cores; the plain floor is one process. The machine "
                 "was shared with other helpers' runs (load far above 2), so wall times are noisy: the CPU "
                 "seconds and the side-by-side ratios are the numbers to read. seqpar's routed calls are one "
                 "opaque custom-op node each (seqpar.custom_ops), so the model is one graph without breaks.",
    })


if __name__ == "__main__":
    main()
