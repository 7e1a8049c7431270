"""Where a ring step's CPU goes: seqpar ``ring_attention`` (zigzag, causal) against ring-flash-attn's zigzag ring and
torch CP's private ring, one forward+backward at a time on W gloo ranks, same inputs and the same aten CPU flash
kernel underneath (``bench/peers.py``'s stand-in for flash-attn).

    python bench/ring_profile.py [--world-size 4] [--seq-len 8192] [--dtype float32] [--repeats 5]
                                 [--peers ring_flash_attn_zigzag torch_cp_ring] [--rank 0]

Every top-level aten call of the step (a ``TorchDispatchMode``) is charged the CPU seconds of the calling thread
(``time.thread_time``), not wall time: on a loaded machine wall time is mostly waiting for a core, CPU time is
the work. Kernel calls are keyed by their q / k shapes, so one sees whether two implementations call the kernel on
the same blocks. Per implementation: the kernel CPU, the other aten ops' CPU, the rest of the thread's CPU
(Python, autograd), and the process CPU (gloo's threads too), medians of ``--repeats`` interleaved steps.
(Measuring adds a few microseconds per aten call to each side.) Writes nothing: the diagnostic behind the ring
rows of bench/results/peers.json (issue 19).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402
from common import run_ranks  # noqa: E402

KERNEL_PREFIX = "_scaled_dot_product_flash_attention_for_cpu"


class _OpCPU(TorchDispatchMode):
    """Thread CPU seconds and calls per top-level aten op (nested ones are inside their caller's time)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        result = func(*args, **(kwargs or {}))
        elapsed = time.thread_time() - start
        name = func.overloadpacket.__name__
        if name.startswith(KERNEL_PREFIX):  # the q and k operands: (B, H, S, D)
            q, k = (args[1], args[2]) if name.endswith("backward") else (args[0], args[1])
            name = f"{'bwd' if name.endswith('backward') else 'fwd'} kernel q{tuple(q.shape)} k{tuple(k.shape)}"
        entry = self.ops[name]
        entry[0] += 1
        entry[1] += elapsed
        return result


def _profile_rank(config: dict) -> dict:
    peers.install_flash_stand_in()
    from seqpar.collectives.layout import shard_sequence

    group = dist.group.WORLD
    dtype = getattr(torch, config["dtype"])
    impls = {"seqpar": peers._seqpar_op("ring_attention", "zigzag", group)}
    for name in config["peers"]:
        impls[name] = peers.PEER_BUILDERS[name](group, peers.HEAD_DIM ** -0.5)
    inputs = [shard_sequence(t, group=group, layout="zigzag").to(dtype).contiguous()
              for t in peers.global_inputs(config["seq_len"])]

    def step(fn):
        leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
        fn(*leaves).backward(inputs[3])

    for fn in impls.values():
        step(fn)  # warm-up
    samples = {name: [] for name in impls}
    order = list(impls)
    for rep in range(config["repeats"]):
        for name in order if rep % 2 == 0 else order[::-1]:
            dist.barrier()
            mode = _OpCPU()
            thread, process = time.thread_time(), time.process_time()
            with mode:
                step(impls[name])
            samples[name].append({"thread": time.thread_time() - thread, "process": time.process_time() - process,
                                  "ops": {k: tuple(v) for k, v in mode.ops.items()}})
    return samples


def _median_ops(samples: list[dict]) -> dict[str, tuple[int, float]]:
    names = {k for s in samples for k in s["ops"]}
    return {k: (max(s["ops"].get(k, (0, 0))[0] for s in samples),
                statistics.median(s["ops"].get(k, (0, 0.0))[1] for s in samples)) for k in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=0, help="whose ops to list (every rank's totals are printed)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--peers", nargs="+", default=["ring_flash_attn_zigzag"],
                        choices=["ring_flash_attn_zigzag", "torch_cp_ring"])
    args = parser.parse_args()
    config = {"dtype": args.dtype, "seq_len": args.seq_len, "repeats": args.repeats, "peers": args.peers}
    results = run_ranks(_profile_rank, args.world_size, config)
    names = list(results[0])
    print(f"W={args.world_size} S={args.seq_len} {args.dtype}, B=1 H={peers.HEADS} D={peers.HEAD_DIM}, causal fwd+bwd; "
          f"CPU ms, medians of {args.repeats} interleaved steps")
    for rank, samples in enumerate(results):
        cells = []
        for name in names:
            ops = _median_ops(samples[name])
            kernel = sum(ms for k, (_, ms) in ops.items() if "kernel" in k)
            other = sum(ms for k, (_, ms) in ops.items() if "kernel" not in k)
            thread = statistics.median(s["thread"] for s in samples[name])
            process = statistics.median(s["process"] for s in samples[name])
            cells.append(f"{name}: thread {thread * 1e3:.0f} = kernels {kernel * 1e3:.0f} + other aten "
                         f"{other * 1e3:.1f} + rest {(thread - kernel - other) * 1e3:.1f}; process {process * 1e3:.0f}")
        print(f"rank {rank}: " + " | ".join(cells))
    ops = {name: _median_ops(results[args.rank][name]) for name in names}
    keys = sorted({k for o in ops.values() for k in o}, key=lambda k: -max(o.get(k, (0, 0.0))[1] for o in ops.values()))
    print(f"\nrank {args.rank}, top-level aten ops: CPU ms (calls)")
    print(f"{'op':62s}" + "".join(f"{n[:20]:>22s}" for n in names))
    for k in keys[:args.top]:
        print(f"{k[:62]:62s}" + "".join(f"{ops[n].get(k, (0, 0.0))[1] * 1e3:14.2f} ({ops[n].get(k, (0, 0))[0]:4d})"
                                        for n in names))
    for name in names:
        print(f"{name}: {sum(c for c, _ in ops[name].values())} top-level aten calls")


if __name__ == "__main__":
    main()
