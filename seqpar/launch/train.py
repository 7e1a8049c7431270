"""seqpar-train: a torchrun training entry point for sequence-parallel causal-LM training.

    torchrun --nproc-per-node 4 -m seqpar.launch.train --model llama-tiny --data longtail --strategy auto \\
        --steps 20 --tokens-per-step 8192 --metrics run/metrics.jsonl --checkpoint-dir run/ckpt

Every rank builds the same model (seeded) and reads the same global batch each step; ``seqpar.parallelize``
shards it. nccl on CUDA, gloo otherwise. Rank 0 shows a progress bar (loss, tokens/s, the step's plan) and
appends one JSON line per step to ``--metrics``. Checkpoints (``torch.distributed.checkpoint``: model,
optimizer, step, data position, RNG) are written to a temporary directory and renamed when complete, so a run
killed mid-write resumes from the last complete one; ``--resume`` continues the exact run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BUILTIN_MODELS = ("llama-tiny", "minimax-tiny")
DATA_KINDS = ("fixed", "uniform", "longtail")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar-train", description="Sequence-parallel causal-LM training (torchrun).")
    p.add_argument("--model", default="llama-tiny", help=f"{' | '.join(BUILTIN_MODELS)} or a transformers config JSON path")
    p.add_argument("--data", default="longtail", help=f"{' | '.join(DATA_KINDS)} (synthetic) or a .npy/.bin token file")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="tokens in each global batch")
    p.add_argument("--max-len", type=int, default=2048, help="longest sequence (synthetic data is clipped to it)")
    p.add_argument("--strategy", default="auto", help="auto | ring | token_ring | ulysses | allgather_kv")
    p.add_argument("--linear-strategy", default="zeco", help="zeco | lasp2 (models with linear attention)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--metrics", type=Path, default=None, help="JSONL file, one line per step (rank 0)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the loss curve (rank 0, needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Every rank checks the options before any collective, so a typo fails everywhere at once."""
    from seqpar.wrapper import STRATEGIES
    from seqpar.runtime import LINEAR_STRATEGIES

    if args.model not in BUILTIN_MODELS and not Path(args.model).is_file():
        raise ValueError(f"--model: {args.model!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a config file")
    if args.data not in DATA_KINDS and not Path(args.data).is_file():
        raise ValueError(f"--data: {args.data!r} is neither {', '.join(DATA_KINDS)} nor a .npy/.bin token file")
    if args.strategy not in STRATEGIES:
        raise ValueError(f"--strategy: unknown {args.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if args.linear_strategy not in LINEAR_STRATEGIES:
        raise ValueError(f"--linear-strategy: unknown {args.linear_strategy!r}; choose one of {', '.join(LINEAR_STRATEGIES)}")
    for name in ("tokens_per_step", "max_len", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr: must be > 0, got {args.lr}")
    if args.resume and args.checkpoint_dir is None:
        raise ValueError("--resume: needs --checkpoint-dir")


def build_model(name: str, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MiniMaxConfig

    torch.manual_seed(seed)
    if name == "llama-tiny":
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)
    elif name == "minimax-tiny":
        config = MiniMaxConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=2,
                               num_experts_per_tok=1, max_position_embeddings=65536, block_size=64,
                               layer_types=["linear_attention", "full_attention"], sliding_window=None)
    else:
        config_dict = json.loads(Path(name).read_text())
        config = AutoConfig.for_model(**config_dict)
    return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, step: int, model, optimizer, data_state: dict) -> None:
    """Write step ``step`` to ``directory/step_N.tmp`` and rename it once every rank has written; ``latest``
    then names it. A crash before the rename leaves the previous checkpoint as the latest complete one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    final, tmp = directory / f"step_{step}", directory / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    extra = {"step": step, "data": data_state, "rng": torch.get_rng_state()}
    torch.save(extra, tmp / f"extra_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = directory / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, directory / "latest")
    dist.barrier()


def load_checkpoint(directory: Path, model, optimizer) -> dict | None:
    """Load the latest complete checkpoint into model and optimizer; returns its extra state (or None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"extra_rank{dist.get_rank()}.pt", weights_only=False)
    torch.set_rng_state(extra["rng"])
    return extra


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def train(args: argparse.Namespace) -> list[dict]:
    import seqpar
    from seqpar.collectives import count_comm
    from seqpar.launch.data import make_source

    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(args.model, args.seed).to(device)
    vocab = model.config.vocab_size
    source = make_source(args.data, vocab=vocab, tokens_per_step=args.tokens_per_step, max_len=args.max_len,
                         seed=args.seed)
    sp_model = seqpar.parallelize(model, strategy=args.strategy, linear_strategy=args.linear_strategy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    start_step = 0
    if args.resume:
        extra = load_checkpoint(args.checkpoint_dir, model, optimizer)
        if extra is not None:
            start_step = extra["step"]
            source.load_state(extra["data"])
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start_step, desc="seqpar-train", file=sys.stdout)
    history = []
    for step in range(start_step, args.steps):
        batch = [t.to(device) for t in source.next_batch()]
        start = time.perf_counter()
        with count_comm() as stats:
            local = sp_model.prepare(batch)
            out = sp_model(**local)
            out.loss.backward()
            sp_model.sync_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        record = {
            "step": step + 1, "loss": out.loss.item(), "tokens": sum(int(t.numel()) for t in batch),
            "sequences": len(batch), "seconds": elapsed, "bytes_sent_rank": stats.bytes_sent,
            "plan": _plan_summary(out), "peak_memory_bytes": _peak_memory_bytes(device),
        }
        record["tokens_per_s"] = record["tokens"] / elapsed
        history.append(record)
        if rank == 0:
            if args.metrics is not None:
                args.metrics.parent.mkdir(parents=True, exist_ok=True)
                with args.metrics.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                     plan=record["plan"])
                progress.update(1)
        if args.checkpoint_dir is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(args.checkpoint_dir, step + 1, model, optimizer, source.state())
    if progress is not None:
        progress.close()
    if args.checkpoint_dir is not None and not args.checkpoint_every:
        save_checkpoint(args.checkpoint_dir, args.steps, model, optimizer, source.state())
    return history


def _plan_summary(out: Any) -> str:
    """What the step ran, from ``SPOutput``: ``"ring x4"`` (fixed strategy) or each plan group's
    ``strategy x ranks [sequences]``."""
    if out.plan is None:
        pair = "+".join(s for s in (out.softmax_strategy, out.linear_strategy) if s)
        return f"{pair} x{len(out.group_ranks)}"
    return " ".join(f"{g.strategy}x{len(g.ranks)}[{len(g.seq_indices)}]" for g in out.plan.groups)


def print_summary(history: list[dict], args: argparse.Namespace) -> None:
    if not history:
        print("nothing to do: the checkpoint is already at --steps")
        return
    first, last = history[0], history[-1]
    median_tps = sorted(h["tokens_per_s"] for h in history)[len(history) // 2]
    rows = [
        ("model / ranks", f"{args.model} / {dist.get_world_size()} ({dist.get_backend()})"),
        ("strategy", args.strategy),
        ("steps", f"{first['step']}..{last['step']}"),
        ("loss first -> last", f"{first['loss']:.4f} -> {last['loss']:.4f}"),
        ("tokens per step", str(last["tokens"])),
        ("median tokens/s", f"{median_tps:.0f}"),
        ("bytes sent per rank (last step)", f"{last['bytes_sent_rank'] / 1e6:.2f} MB"),
        ("last plan", last["plan"]),
        ("peak memory rank 0", f"{last['peak_memory_bytes'] / 2**20:.0f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\nseqpar-train summary")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (global token mean)")
        ax.set_title(f"seqpar-train {args.model}, {dist.get_world_size()} ranks, strategy {args.strategy}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"  loss curve: {args.plot}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
    except ValueError as err:
        print(f"seqpar-train: error: {err}", file=sys.stderr)
        return 2
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    try:
        history = train(args)
        if dist.get_rank() == 0:
            print_summary(history, args)
        dist.barrier()  # tearing gloo down while a peer still sends aborts that peer
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
