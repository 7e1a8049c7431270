"""Weak and strong scaling of every SP op and of a training step, over 1..W ranks of one torchrun job.

    torchrun --standalone --nproc-per-node 8 bench/scaling.py               # GPUs: nccl, bf16, real kernels
    torchrun --standalone --nproc-per-node 2 bench/scaling.py --smoke       # CPU: gloo, float32, tiny sizes

With CUDA: nccl for the ops (the process group is "cpu:gloo,cuda:nccl", so ``bench/common.median_time`` can
take its max over ranks of a CPU timer), bfloat16, kernel backend ``auto`` (Triton / flash-attn where they
run). Without CUDA: gloo, float32, small sizes; the result is a smoke check that every op runs at every P, NOT a
performance measurement (P ranks share this machine's cores), and is labelled so.

For each P in 1, 2, 4, ..., W (and W) a group of ranks 0..P-1 runs; the other ranks wait in the same barriers.
Weak scaling: ``--tokens-per-rank`` tokens on every rank (S = P * tokens). Strong: ``--strong-tokens`` in all
(default tokens-per-rank * W), split over P. Ops (forward + backward, B = 1, causal, H heads of size D):

* ring_attention, token_ring_attention, ulysses_attention, allgather_kv_attention (seqpar.collectives; zigzag)
* lasp2_linear_attention, zeco_linear_attention (seqpar.collectives.lasp2 / .zeco; contiguous, per-head decay),
  imported lazily: an op whose module does not import is skipped with a printed note
* train_step: seqpar.launch.train.build_model("llama-tiny") through seqpar.parallelize(strategy="ring"),
  forward, backward, gradient all-reduce, AdamW step (CUDA: autocast to bfloat16)

Reported per (mode, op, P): median step time over ``--repeats`` (slowest rank, ``median_time(sync=True)``),
tokens/s, tokens/s per rank, TFLOP/s per rank, efficiency = TFLOP/s per rank at P / the same op's at P = 1
(weak and strong alike: ideal is 1.0 for both), bytes sent per rank (``count_comm``, one extra step).
FLOPs: softmax attention forward 4 S^2 H D / 2 (causal), forward + backward 3.5x that (backward 2.5x forward,
FlashAttention-2's count, as the cost model and bench/gpu_check.py); linear attention (chunk C = 64) forward
S H (C (Dk + Dv) + 4 Dk Dv), forward + backward 3x (the cost model's count); training step 6 N S (N: the
parameters but the embedding) plus the attention layers' count.

Writes bench/results/scaling_<label>.json (label ``cpu_smoke`` on CPU, else e.g. ``h100_8gpu``) and, except
for the CPU smoke run (unless ``--plot``), bench/results/scaling_<label>.png (efficiency vs P).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median_time, print_table, save_results  # noqa: E402

SOFTMAX_OPS = ("ring_attention", "token_ring_attention", "ulysses_attention", "allgather_kv_attention")
LINEAR_OPS = {"lasp2_linear_attention": "seqpar.collectives.lasp2", "zeco_linear_attention": "seqpar.collectives.zeco"}
LINEAR_CHUNK = 64
ATTN_FWD_BWD = 3.5  # forward + backward over forward (backward 2.5x forward)
LINEAR_FWD_BWD = 3.0
TRAIN_MAX_LEN = 65536  # llama-tiny's max_position_embeddings (seqpar.launch.train.build_model)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats (the default without CUDA)")
    p.add_argument("--tokens-per-rank", type=int, default=None, help="weak scaling (GPU 16384, smoke 256)")
    p.add_argument("--strong-tokens", type=int, default=None, help="strong scaling total (default tokens-per-rank * W)")
    p.add_argument("--train-tokens-per-rank", type=int, default=None, help="training step, weak (GPU 4096, smoke 128)")
    p.add_argument("--heads", type=int, default=None, help="query heads (GPU 16, smoke 4)")
    p.add_argument("--head-dim", type=int, default=None, help="GPU 128, smoke 32")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per point (GPU 10, smoke 2)")
    p.add_argument("--ops", default=",".join((*SOFTMAX_OPS, *LINEAR_OPS, "train_step")),
                   help="comma-separated subset of the ops")
    p.add_argument("--modes", default="weak,strong")
    p.add_argument("--plot", action="store_true", help="also plot the CPU smoke run")
    p.add_argument("--label", default=None, help="results name: scaling_<label>.json")
    return p.parse_args(argv)


def sizes(args: argparse.Namespace, cuda: bool, world: int) -> dict:
    small = args.smoke or not cuda
    out = {
        "tokens_per_rank": args.tokens_per_rank or (256 if small else 16384),
        "train_tokens_per_rank": args.train_tokens_per_rank or (128 if small else 4096),
        "heads": args.heads or (4 if small else 16),
        "head_dim": args.head_dim or (32 if small else 128),
        "repeats": args.repeats or (2 if small else 10),
        "warmup": 1 if small else 3,
    }
    out["strong_tokens"] = args.strong_tokens or out["tokens_per_rank"] * world
    return out


def degrees(world: int) -> list[int]:
    out, p = [], 1
    while p <= world:
        out.append(p)
        p *= 2
    return out if out[-1] == world else out + [world]


def attention_flops(S: int, H: int, D: int) -> float:
    return ATTN_FWD_BWD * 4 * S * S * H * D / 2


def linear_flops(S: int, H: int, D: int) -> float:
    return LINEAR_FWD_BWD * S * H * (LINEAR_CHUNK * 2 * D + 4 * D * D)


def load_ops(names: list[str]) -> tuple[dict, list[str]]:
    ops, notes = {}, []
    import seqpar.collectives as collectives

    for name in names:
        if name in SOFTMAX_OPS:
            ops[name] = getattr(collectives, name)
        elif name in LINEAR_OPS:
            try:
                ops[name] = getattr(importlib.import_module(LINEAR_OPS[name]), name)
            except (ImportError, AttributeError) as err:
                notes.append(f"{name}: skipped, {LINEAR_OPS[name]} does not import ({err})")
        elif name != "train_step":
            raise SystemExit(f"--ops: unknown op {name!r}")
    return ops, notes


def op_step(name, op, group, S_local: int, H: int, D: int, device, dtype):
    gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    q, k, v, dout = (torch.randn(1, S_local, H, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    if name in LINEAR_OPS:
        decay = -torch.linspace(0.01, 0.2, H, device=device, dtype=torch.float32)
        kwargs = {"group": group, "log_decay": decay}
    else:
        kwargs = {"group": group, "causal": True, "layout": "zigzag"}

    def step():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        op(*leaves, **kwargs).backward(dout)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def train_step(group, S: int, device):
    import seqpar
    from seqpar.launch.train import build_model

    model = build_model("llama-tiny", 0).to(device)
    sp_model = seqpar.parallelize(model, group=group, strategy="ring")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)  # the same global batch on every rank
    batch = {"input_ids": torch.randint(model.config.vocab_size, (1, S), generator=gen).to(device)}
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embed
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    flops = 6 * n * S + cfg.num_hidden_layers * attention_flops(S, cfg.num_attention_heads, head_dim)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            local = sp_model.prepare(batch)
            out = sp_model(**local)
        out.loss.backward()
        sp_model.sync_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, flops


def measure(step, member: bool, cfg: dict) -> tuple[float, int]:
    """Median step time (slowest rank) and this rank's bytes for one more step; every rank calls it."""
    from seqpar.collectives import count_comm

    t = median_time(step if member else (lambda: None), repeats=cfg["repeats"], warmup=cfg["warmup"], sync=True)
    nbytes = 0
    if member:
        with count_comm() as stats:
            step()
        nbytes = stats.bytes_sent
    return t, nbytes


def run(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = sizes(args, cuda, world)
    names = [n for n in args.ops.split(",") if n]
    ops, notes = load_ops(names)
    if rank == 0:
        for note in notes:
            print(note, flush=True)
    modes = [m for m in args.modes.split(",") if m]
    groups = {p: (None if p == world else dist.new_group(list(range(p)))) for p in degrees(world)}
    H, D = cfg["heads"], cfg["head_dim"]
    rows = []
    for mode in modes:
        for p in degrees(world):
            member = rank < p
            group = groups[p]
            for name, op in ops.items():
                S = cfg["tokens_per_rank"] * p if mode == "weak" else cfg["strong_tokens"]
                if S % (2 * p):
                    continue
                if name == "ulysses_attention" and H % p:
                    if rank == 0:
                        print(f"{mode} P={p} {name}: skipped, {p} does not divide {H} heads", flush=True)
                    continue
                step = op_step(name, op, group, S // p, H, D, device, dtype) if member else None
                t, nbytes = measure(step, member, cfg)
                flops = linear_flops(S, H, D) if name in LINEAR_OPS else attention_flops(S, H, D)
                rows.append(_row(mode, name, p, S, t, flops, nbytes))
                del step
            if "train_step" in names:
                S = cfg["train_tokens_per_rank"] * p if mode == "weak" else cfg["train_tokens_per_rank"] * world
                if S > TRAIN_MAX_LEN:
                    if rank == 0:
                        print(f"{mode} P={p} train_step: skipped, {S} tokens > llama-tiny's {TRAIN_MAX_LEN}",
                              flush=True)
                else:
                    step, flops = train_step(group, S, device) if member else (None, 0.0)
                    t, nbytes = measure(step, member, cfg)
                    flops_t = torch.tensor([float(flops)])
                    dist.broadcast(flops_t, src=0, group=None)  # rank 0 is in every group
                    rows.append(_row(mode, "train_step", p, S, t, flops_t.item(), nbytes))
                    del step
            if rank == 0:
                print(f"{mode} P={p}: done", flush=True)
    for r in rows:
        base = next((b for b in rows if b["mode"] == r["mode"] and b["op"] == r["op"] and b["P"] == 1), None)
        r["efficiency"] = None if base is None else r["tflops_per_rank"] / base["tflops_per_rank"]
    backends = {}
    try:
        from seqpar.kernels.attention import get_attention_backend

        backends["attention"] = get_attention_backend("auto", device, dtype).name
    except Exception as err:  # informative only
        backends["attention"] = f"unknown ({err})"
    return {"cfg": cfg, "rows": rows, "notes": notes, "device": str(device), "dtype": str(dtype), "backends": backends}


def _row(mode: str, op: str, p: int, S: int, t: float, flops: float, nbytes: int) -> dict:
    return {"mode": mode, "op": op, "P": p, "S": S, "tokens_per_rank": S // p, "median_s": t,
            "tokens_per_s": S / t, "tokens_per_s_per_rank": S / t / p, "tflops_per_rank": flops / p / t / 1e12,
            "rank0_MB_sent": nbytes / 1e6}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for op in dict.fromkeys(r["op"] for r in rows):
            pts = [r for r in rows if r["mode"] == mode and r["op"] == op]
            ax.plot([r["P"] for r in pts], [r["efficiency"] or float("nan") for r in pts], "o-", label=op)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="ranks P", ylabel="TFLOP/s per rank / same op at P=1", title=f"{title}: {mode} scaling")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
        torch.set_num_threads(1)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    started = time.perf_counter()
    try:
        result = run(args)
        if dist.get_rank() == 0:
            world = dist.get_world_size()
            if args.label:
                label = args.label
            elif not cuda:
                label = "cpu_smoke"
            else:
                gpu = re.sub(r"[^a-z0-9]+", "", torch.cuda.get_device_name().lower().replace("nvidia", ""))[:12]
                label = f"{gpu}_{world}gpu" + ("_smoke" if args.smoke else "")
            rows = result["rows"]
            print()
            print_table(rows, ["mode", "op", "P", "S", "median_s", "tokens_per_s", "tflops_per_rank", "efficiency",
                               "rank0_MB_sent"])
            kind = ("CPU SMOKE CHECK (gloo, float32, tiny sizes, ranks share the cores): shows every op runs at "
                    "every P; NOT a performance measurement") if not cuda else "GPU measurement (nccl, bfloat16)"
            path = save_results(f"scaling_{label}", {
                "kind": kind, "world": world, "backend": backend, "device": result["device"],
                "dtype": result["dtype"], "kernel_backends": result["backends"], "config": result["cfg"],
                "flops": {"softmax": "3.5 * 4 S^2 H D / 2", "linear": "3 * S H (64 * 2D + 4 D^2)",
                          "train_step": "6 N S + layers * softmax"},
                "notes": result["notes"], "rows": rows, "wall_s": time.perf_counter() - started,
            })
            print(f"\n{kind}\nwrote {path}")
            if cuda or args.plot:
                png = RESULTS / f"scaling_{label}.png"
                plot(rows, png, f"{label} ({world} ranks)")
                print(f"wrote {png}")
        dist.barrier()  # every rank leaves together: no rank tears down while rank 0 still writes
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
