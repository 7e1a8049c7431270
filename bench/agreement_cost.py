"""What the cross-rank agreement check (on by default) costs each SP op, at S = 4K on CPU gloo.

    python bench/agreement_cost.py [--quick] [--seq-len 4096] [--repeats 7]

For each op (ring, token_ring, ulysses, allgather_kv: causal, zigzag; lasp2, zeco: per-head decay and an
initial state, so that the contents of both whole-held inputs are hashed) at P = 2 and 4, a forward + backward
of one layer runs with the check (the default) and without it (``comm.agreement_checks(False)``), the two
interleaved within each repeat so that both see the same background load (this machine is shared). Reported:
the median step time of each (the slowest rank's), their ratio, the median of the ratios of the two runs of
each repeat (steadier under drifting load), and the check alone: the median time of the
op's argument checks (``prepare_softmax_sp`` / ``prepare_linear_sp``) with the agreement check minus without
it, as a fraction of the op's step. The ratio of two noisy
medians can swing by a few percent either way; the check's own time is the steadier number. Writes
bench/results/agreement_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_ranks, save_results  # noqa: E402

from seqpar.collectives.lasp2 import prepare_linear_sp  # noqa: E402
from seqpar.collectives.softmax_common import prepare_softmax_sp  # noqa: E402
from seqpar.collectives import (  # noqa: E402
    allgather_kv_attention,
    comm,
    lasp2_linear_attention,
    ring_attention,
    shard_sequence,
    token_ring_attention,
    ulysses_attention,
    zeco_linear_attention,
)

SOFTMAX = {"ring": ring_attention, "token_ring": token_ring_attention, "ulysses": ulysses_attention,
           "allgather_kv": allgather_kv_attention}
LINEAR = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}
HEADS, HEAD_DIM = 4, 64


def _softmax_step(op, seq_len: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (shard_sequence(torch.randn(1, seq_len, HEADS, HEAD_DIM, generator=gen)) for _ in range(4))

    def step():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        op(*leaves, causal=True).backward(dout)

    def check():  # the op's argument checks, agreement included (the op's first collective)
        prepare_softmax_sp(q, k, v, group=None, causal=True, softmax_scale=None, layout="zigzag", cu_seqlens=None,
                           op=op.__name__)

    return step, check


def _linear_step(op, seq_len: int):
    p, rank = dist.get_world_size(), dist.get_rank()
    s_local = seq_len // p
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, seq_len, HEADS, HEAD_DIM, generator=gen)[:, rank * s_local:(rank + 1) * s_local]
                     for _ in range(4))
    q, k = q / HEAD_DIM ** 0.5, k / HEAD_DIM ** 0.5
    log_decay = -0.05 - 0.2 * torch.rand(HEADS, generator=gen)
    initial = torch.randn(1, HEADS, HEAD_DIM, HEAD_DIM, generator=gen)

    def step():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, log_decay, initial)]
        op(*leaves[:3], log_decay=leaves[3], initial_state=leaves[4]).backward(dout)

    def check():  # the op's argument checks, agreement included (the op's first collective)
        prepare_linear_sp(q, k, v, log_decay, initial, group=None, scale=None, layout="contiguous", backend="auto",
                          op=op.__name__, extra="output_final_state=False")

    return step, check


def _timed(fn) -> float:
    """Wall time of ``fn`` on the slowest rank, started together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def measure(seq_len: int, repeats: int, check_calls: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for name, op in {**SOFTMAX, **LINEAR}.items():
        step, check = (_softmax_step if name in SOFTMAX else _linear_step)(op, seq_len)
        step()  # warm-up, with the check
        times = {"with": [], "without": []}
        for i in range(repeats):  # interleaved, and alternating which goes first
            order = ("with", "without") if i % 2 == 0 else ("without", "with")
            for variant in order:
                with comm.agreement_checks(variant == "with"):
                    times[variant].append(_timed(step))
        check()
        check_s = statistics.median(_timed(check) for _ in range(check_calls))
        with comm.agreement_checks(False):
            local_s = statistics.median(_timed(check) for _ in range(check_calls))
        with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
        rows.append({"op": name, "with_s": with_s, "without_s": without_s, "check_s": check_s - local_s,
                     "times_with": times["with"], "times_without": times["without"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="global tokens (default 4096)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats per variant (>= 5)")
    parser.add_argument("--quick", action="store_true", help="S = 512, 5 repeats (smoke run)")
    args = parser.parse_args()
    seq_len, repeats = (512, 5) if args.quick else (args.seq_len, args.repeats)
    if repeats < 5:
        parser.error("--repeats: at least 5")
    rows = []
    for p in (2, 4):
        for res in run_ranks(measure, p, seq_len, repeats, 50)[0]:
            rows.append({
                "op": res["op"], "P": p, "S": seq_len,
                "with_ms": 1e3 * res["with_s"], "without_ms": 1e3 * res["without_s"],
                "ratio": res["with_s"] / res["without_s"],
                "paired ratio": statistics.median(a / b for a, b in zip(res["times_with"], res["times_without"])),
                "check_us": 1e6 * res["check_s"], "check/op %": 100 * res["check_s"] / res["without_s"],
                "times_with_s": res["times_with"], "times_without_s": res["times_without"],
            })
        print(f"P={p} done", flush=True)
    print(f"\nAgreement check cost, forward + backward of one layer, S = {seq_len}, H = {HEADS}, D = {HEAD_DIM}, "
          f"float32, median of {repeats} interleaved repeats (slowest rank); check alone: median of 50 calls")
    print_table(rows, ["op", "P", "with_ms", "without_ms", "ratio", "paired ratio", "check_us", "check/op %"])
    path = save_results("agreement_cost", {
        "seq_len": seq_len, "heads": HEADS, "head_dim": HEAD_DIM, "repeats": repeats, "rows": rows,
        "note": "ratio = median step with the check / without; paired ratio = median over repeats of (with / without) "
                "within the repeat; check/op % = the check alone (median of 50 "
                "prepare_*_sp calls with it minus without it) over the step without it. "
                "CPU gloo, P ranks share this machine's cores.",
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
