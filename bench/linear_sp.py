"""Linear-attention SP on CPU gloo: LASP-2 vs ZeCO vs an all-gather-KV baseline, forward+backward time and bytes.

    python bench/linear_sp.py [--quick] [--link-only]

For P in {2, 4} and several sequence lengths, each op runs a forward+backward of one linear-attention layer
with per-token decay (simple-GLA style) on P ranks (one thread each); the table reports the median step time
of repeats as a ratio to LASP-2's (the ops interleaved within each repeat), and the bytes the busiest rank
sent (forward + backward, from ``count_comm()``). A second table repeats the longest length with an emulated
link slower than the compute (``comm.set_link_emulation``, arrival semantics: ZeCO's relay is charged hop by
hop), where the bytes decide; ``--link-only`` re-measures just that table (~3 min) and keeps the recorded
link-off rows. Writes bench/results/linear_sp.json.

The all-gather-KV baseline is what one would do without a state-passing algorithm: all-gather K, V and the
decay of the whole sequence (backward: reduce-scatter of their gradients), then every rank recomputes the
state of all earlier tokens itself. Its bytes grow with S; LASP-2's and ZeCO's do not.

On this 2-core machine P ranks share 2 cores, so the ratios compare the algorithms with each other, not the
speedup a P-GPU run gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, run_ranks, save_results  # noqa: E402

from seqpar.collectives import comm  # noqa: E402
from seqpar.collectives.lasp2 import chunk_state, lasp2_linear_attention  # noqa: E402
from seqpar.collectives.zeco import zeco_linear_attention  # noqa: E402
from seqpar.kernels.linear import linear_attention_chunk  # noqa: E402

HEADS, DK, DV = 8, 64, 64
OPS = ["lasp2", "zeco", "allgather_kv"]


def allgather_kv_linear(q, k, v, *, log_decay):
    """Baseline: gather K, V and the per-token decay of the whole sequence, recompute the prefix state locally.

    Bytes per rank: forward (P-1) * B*S_local*H*(Dk + Dv + 1) * 4 (one all-gather), backward the same
    (reduce-scatter of the gathered tensor's gradient).
    """
    rank = dist.get_rank()
    packed = torch.cat([k, v, log_decay[..., None]], dim=-1)  # (B, S_local, H, Dk + Dv + 1): one all-gather
    gathered = comm.all_gather_differentiable(packed)  # (P, B, S_local, H, Dk + Dv + 1)
    state = None
    if rank > 0:
        prefix = gathered[:rank].transpose(0, 1).flatten(1, 2)  # (B, rank * S_local, H, .)
        state = chunk_state(prefix[..., :DK], prefix[..., DK:DK + DV], prefix[..., -1])
    # the local k, v, g are read back from the gathered tensor so that every rank's graph runs the all-gather's
    # backward (a reduce-scatter every rank must join); rank 0 would otherwise skip it and leave the others waiting
    mine = gathered[rank]
    k, v, log_decay = mine[..., :DK], mine[..., DK:DK + DV], mine[..., -1]
    o, _ = linear_attention_chunk(q, k, v, log_decay=log_decay, initial_state=state)
    return o


def run_op(name: str, q, k, v, g):
    if name == "lasp2":
        return lasp2_linear_attention(q, k, v, log_decay=g)
    if name == "zeco":
        return zeco_linear_attention(q, k, v, log_decay=g)
    return allgather_kv_linear(q, k, v, log_decay=g)


def measure(lengths: list[int], repeats: int, link_gbps: float | None) -> list[dict]:
    p, rank = dist.get_world_size(), dist.get_rank()
    comm.set_link_emulation(None if link_gbps is None else comm.LinkEmulation(gbps=link_gbps, latency_s=20e-6))
    rows = []
    for seq_len in lengths:
        s_local = seq_len // p
        gen = torch.Generator().manual_seed(seq_len)
        sl = slice(rank * s_local, (rank + 1) * s_local)
        q, k = (torch.randn(1, seq_len, HEADS, DK, generator=gen)[:, sl] for _ in range(2))
        v, dout = (torch.randn(1, seq_len, HEADS, DV, generator=gen)[:, sl] for _ in range(2))
        g = (-0.1 * torch.rand(1, seq_len, HEADS, generator=gen))[:, sl]
        q, k = q / DK ** 0.5, k / DK ** 0.5
        row = {"S": seq_len}
        outputs, steps = {}, {}
        for name in OPS:
            def step(name=name):
                leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g)]
                o = run_op(name, *leaves)
                o.backward(dout)
                return o

            steps[name] = step
            with comm.count_comm() as stats:  # also the warm-up run
                outputs[name] = step().detach()
            row[name] = {"bytes": stats.bytes_sent}
        # interleaved repeats: every op sees the same background load (these machines are shared)
        times = {name: [] for name in OPS}
        for _ in range(repeats):
            for name in OPS:
                dist.barrier()
                start = time.perf_counter()
                steps[name]()
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step costs what the slowest rank takes
                times[name].append(elapsed.item())
        for name in OPS:
            row[name]["time_s"] = statistics.median(times[name])
        # the three must agree (the baseline is only a baseline if it is right)
        ref = outputs["lasp2"]
        row["max_rel_err"] = max(((outputs[n] - ref).norm() / ref.norm()).item() for n in OPS)
        rows.append(row)
    comm.set_link_emulation(None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short lengths, fewer repeats (smoke run)")
    parser.add_argument("--link-only", action="store_true",
                        help="re-measure only the emulated-link table and keep the recorded link-off rows")
    args = parser.parse_args()
    # Kept short: the torch kernel's backward grows faster than linearly in S_local on CPU (every chunk's slice
    # backward allocates a full-length gradient), which would swamp what the SP algorithms differ in.
    lengths = [1024, 2048] if args.quick else [2048, 4096, 8192]
    repeats = 3 if args.quick else 7
    link_gbps = 1.0
    rows, link_rows = [], []
    for p in (2, 4):
        if args.link_only:
            per_rank = run_ranks(measure, p, lengths[-1:], max(2, repeats // 2), link_gbps)
            res = per_rank[0][0]
            link_rows.append({"P": p, "S": lengths[-1], "link_gbps": link_gbps,
                              "lasp2_ms": 1e3 * res["lasp2"]["time_s"],
                              **{f"{n}/lasp2": res[n]["time_s"] / res["lasp2"]["time_s"] for n in OPS}})
            continue
        per_rank = run_ranks(measure, p, lengths, repeats, None)
        for i, seq_len in enumerate(lengths):
            res = per_rank[0][i]
            assert max(r[i]["max_rel_err"] for r in per_rank) < 1e-4, "ops disagree"
            row = {"P": p, "S": seq_len, "lasp2_ms": 1e3 * res["lasp2"]["time_s"]}
            for name in OPS:
                row[f"{name}/lasp2"] = res[name]["time_s"] / res["lasp2"]["time_s"]
                row[f"{name} KB"] = max(r[i][name]["bytes"] for r in per_rank) / 1e3  # the busiest rank
            rows.append(row)
        print(f"P={p} done", flush=True)
        per_rank = run_ranks(measure, p, lengths[-1:], max(2, repeats // 2), link_gbps)
        res = per_rank[0][0]
        link_rows.append({"P": p, "S": lengths[-1], "link_gbps": link_gbps, "lasp2_ms": 1e3 * res["lasp2"]["time_s"],
                          **{f"{n}/lasp2": res[n]["time_s"] / res["lasp2"]["time_s"] for n in OPS}})
    if args.link_only:  # the link-off rows do not depend on the emulation: keep the recorded ones
        rows = json.loads((RESULTS / "linear_sp.json").read_text())["rows"]
    print("\nforward+backward step time / LASP-2's (median of repeats); KB sent by the busiest rank (fwd+bwd)")
    print_table(rows, ["P", "S", "lasp2_ms"] + [c for n in OPS for c in (f"{n}/lasp2", f"{n} KB")])
    print(f"\nemulated {link_gbps} Gbit/s links (20 us latency): step time / LASP-2's")
    print_table(link_rows, ["P", "S", "link_gbps", "lasp2_ms"] + [f"{n}/lasp2" for n in OPS])
    path = save_results("linear_sp", {
        "config": {"batch": 1, "heads": HEADS, "dk": DK, "dv": DV, "decay": "per-token (B, S, H)",
                   "dtype": "float32", "layout": "contiguous", "repeats": repeats, "threads_per_rank": 1,
                   "zeco_pieces": min(8, DK), "bytes": "busiest rank, forward + backward",
                   **({"link_off_rows": "kept from the recorded run (--link-only)"} if args.link_only else {})},
        "rows": rows, "link_emulated": link_rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
