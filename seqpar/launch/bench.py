"""seqpar-bench: run one of the benchmark scripts of a seqpar source checkout.

    seqpar-bench simulate [--quick]                   # cost model vs the papers (bench/simulate.py)
    seqpar-bench scaling [--nproc-per-node N] [...]   # weak/strong scaling under torchrun (bench/scaling.py)
    seqpar-bench solver [--quick]                     # planner vs static plans (bench/solver.py)
    seqpar-bench attention [--quick]                  # softmax SP ops on CPU gloo (bench/attention_sp.py)
    seqpar-bench linear [--quick]                     # linear-attention SP ops (bench/linear_sp.py)
    seqpar-bench peers [--smoke]                      # seqpar vs DeepSpeed, yunchang, ring-flash-attn, torch CP
    seqpar-bench overlap|soak|gpu [...]               # bench/overlap.py, bench/soak.py, bench/gpu_check.py
    seqpar-bench list                                 # which scripts this checkout has

Design: the benchmarks are not part of the installed package. They live in the repository's ``bench/``, next to
the results they record (``bench/results/``, which they overwrite and which are committed) and to the helpers
they share (``bench/common.py``). This command only finds that directory and runs the script there with the
same Python, passing the remaining arguments through, so ``seqpar-bench X ARGS`` is exactly
``python bench/<script> ARGS``. It looks, in order, in ``$SEQPAR_BENCH_DIR``, in the checkout the package is
installed from (an editable install: ``<repo>/seqpar/launch/bench.py`` -> ``<repo>/bench``) and in
``./bench``; installed from a wheel there is none, and it says so.

``scaling`` needs one process per rank: unless already started by torchrun (``RANK`` set), it runs
``python -m torch.distributed.run --standalone --nproc-per-node N bench/scaling.py ARGS`` with N from
``--nproc-per-node`` (default: the number of CUDA devices, or 2 without CUDA, where the run is the CPU smoke
check).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = {
    "simulate": "simulate.py",
    "scaling": "scaling.py",
    "solver": "solver.py",
    "attention": "attention_sp.py",
    "linear": "linear_sp.py",
    "overlap": "overlap.py",
    "soak": "soak.py",
    "gpu": "gpu_check.py",
    "peers": "peers.py",
}


def bench_dir() -> Path | None:
    """The ``bench/`` directory to run from, or None (see the module docstring for the search order)."""
    candidates = []
    if os.environ.get("SEQPAR_BENCH_DIR"):
        candidates.append(Path(os.environ["SEQPAR_BENCH_DIR"]))
    candidates += [Path(__file__).resolve().parents[2] / "bench", Path.cwd() / "bench"]
    for path in candidates:
        if (path / "common.py").is_file():
            return path
    return None


def _usage() -> str:
    return __doc__.split("\n\n")[0]


def _nproc(argv: list[str]) -> tuple[int, list[str]]:
    """Take ``--nproc-per-node N`` (or ``=N``) out of ``argv``."""
    rest, n = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc-per-node" and i + 1 < len(argv):
            n, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--nproc-per-node="):
            n = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if n is None:
        try:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 2
        except ImportError:
            n = 2
    if not str(n).isdigit() or int(n) < 1:
        raise ValueError(f"--nproc-per-node: expected a positive integer, got {n!r}")
    return int(n), rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    directory = bench_dir()
    if command == "list":
        print(f"bench directory: {directory or 'not found'}")
        for name, script in SCRIPTS.items():
            have = directory is not None and (directory / script).is_file()
            print(f"  {name:<10} bench/{script}{'' if have else '  (missing)'}")
        return 0
    if command not in SCRIPTS:
        print(f"seqpar-bench: error: unknown benchmark {command!r}; choose one of {', '.join(SCRIPTS)} or list",
              file=sys.stderr)
        return 2
    if directory is None:
        print("seqpar-bench: error: no bench/ directory found. The benchmarks ship with the source tree, not the "
              "package: run from a checkout (pip install -e .), or set SEQPAR_BENCH_DIR=<repo>/bench",
              file=sys.stderr)
        return 2
    script = directory / SCRIPTS[command]
    if not script.is_file():
        print(f"seqpar-bench: error: {script} does not exist in this checkout", file=sys.stderr)
        return 2
    if command == "scaling" and "RANK" not in os.environ:
        try:
            n, rest = _nproc(rest)
        except ValueError as err:
            print(f"seqpar-bench: error: {err}", file=sys.stderr)
            return 2
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(script),
               *rest]
    else:
        cmd = [sys.executable, str(script), *rest]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
