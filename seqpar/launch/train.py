"""seqpar-train: a torchrun training entry point for sequence-parallel causal-LM training.

    torchrun --nproc-per-node 4 -m seqpar.launch.train --model llama-tiny --data longtail --strategy auto \\
        --steps 20 --tokens-per-step 8192 --metrics run/metrics.jsonl --checkpoint-dir run/ckpt

Every rank builds the same model (seeded) and reads the same global batch each step; ``seqpar.parallelize``
shards it (``--dp N``: N data-parallel replicas, each training on its own part of the step's batch, on a
("dp", "sp") mesh). ``--fsdp`` (meant to be the default with more than one rank) shards weights, gradients and
optimizer state over all ranks with FSDP2; ``--activation-checkpointing`` recomputes each decoder layer in backward;
``--micro-batch-tokens N`` runs a step as micro-batches of at most N tokens per rank, accumulating gradients.
With ``--strategy auto`` rank 0 plans step t+1 in a background process while step t trains (``--no-plan-ahead``:
inline), and ``--calibrate [FILE]`` plans with a cost model fitted to this machine (profiled once, cached).
"cpu:gloo,cuda:nccl" on CUDA (NCCL for the tensors on the GPU, gloo for the few on the host), gloo otherwise.
Rank 0 shows a progress bar (loss, tokens/s, the step's plan) and appends one JSON line per step to
``--metrics`` (a resumed run first drops the lines of steps after its checkpoint, so no step is logged twice).
Checkpoints (``seqpar.launch.checkpoint``: model, optimizer, step, data position, RNG; sha256-verified,
pickle-free; sharded with ``torch.distributed.checkpoint`` under ``--fsdp``) are written to a temporary
directory and renamed when complete, so a run killed mid-write resumes from the last complete one;
``--resume`` continues the exact run, also on another world size. The last step is always saved.

Safety rails: options, the token file and the checkpoint directory are checked on every rank before any
collective; rank 0 holds a lock on the checkpoint directory for the run; a non-finite loss or gradient stops
training before the optimizer step (``--skip-nonfinite N`` skips up to N such steps instead); every wait is
bounded by ``SEQPAR_COMM_TIMEOUT_S``. Exit codes: 0 done, 1 training or checkpoint failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BUILTIN_MODELS = ("llama-tiny", "minimax-tiny")
DATA_KINDS = ("fixed", "uniform", "longtail")
# Optimizer settings that the command line may change on resume; None in the parsed options means "not given":
# a fresh run then uses the default, a resumed one keeps the checkpoint's value.
OPTIMIZER_DEFAULTS = {"lr": 3e-3, "weight_decay": 0.0}
# Whether --fsdp is on by default with more than one rank (why it is: ``resolve_fsdp``).
FSDP_BY_DEFAULT = True


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient more often than ``--skip-nonfinite`` allows."""


DEFAULT_CALIBRATION = Path("seqpar-calibration.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar-train", description="Sequence-parallel causal-LM training (torchrun).")
    p.add_argument("--model", default="llama-tiny",
                   help=f"{' | '.join(BUILTIN_MODELS)} or a transformers config JSON path")
    p.add_argument("--data", default="longtail", help=f"{' | '.join(DATA_KINDS)} (synthetic) or a .npy/.bin token file")
    p.add_argument("--data-dtype", default=None, help="how a headerless .bin file stores ids: uint16 (nanoGPT), "
                   "uint32, int32, int64 (required for .bin)")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="tokens in each global batch")
    p.add_argument("--max-len", type=int, default=2048, help="longest sequence (synthetic data is clipped to it)")
    p.add_argument("--strategy", default="auto", help="softmax-attention SP: auto (planned per step) or a registered "
                   "strategy (seqpar.strategies: ring, token_ring, ulysses, allgather_kv, usp)")
    p.add_argument("--linear-strategy", default="zeco", help="linear-attention SP: a registered linear strategy "
                   "(zeco, lasp2), for models with linear attention")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {OPTIMIZER_DEFAULTS['lr']}; "
                   "on --resume: the checkpoint's unless given)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0; on --resume: "
                   "the checkpoint's unless given)")
    p.add_argument("--skip-nonfinite", type=int, default=0, help="skip up to N steps whose loss or gradient is not "
                   "finite (no optimizer step on them) before stopping with an error")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="shard weights, gradients "
                   "and optimizer state over all ranks with FSDP2 (fully_shard per decoder layer and the root, "
                   "before parallelize); checkpoints are then sharded (DCP). Default: on with more than one rank")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer in "
                   "backward instead of storing its activations (HF gradient checkpointing, non-reentrant)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas: a (dp, sp) mesh of N replicas of "
                   "world/N SP ranks; each trains on its own part of every step's batch")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="run each step as micro-batches of at most "
                   "N tokens per rank (prepare's max_tokens_per_rank), accumulating gradients")
    p.add_argument("--calibrate", nargs="?", type=Path, const=DEFAULT_CALIBRATION, default=None, metavar="FILE",
                   help="with --strategy auto: plan with a cost model fitted to this machine (a short profile of "
                   "every group shape at two lengths, run once and cached in FILE; default "
                   f"{DEFAULT_CALIBRATION})")
    p.add_argument("--plan-ahead", action=argparse.BooleanOptionalAction, default=True,
                   help="with --strategy auto: plan step t+1 in the background while step t trains (default on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end; "
                   "the last step is always saved)")
    p.add_argument("--keep-last", type=int, default=3, help="keep the K newest checkpoints (0: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint; --steps "
                   "below its step is refused")
    p.add_argument("--metrics", type=Path, default=None, help="JSONL file, one line per step (rank 0)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the loss curve (rank 0, needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_fsdp(args: argparse.Namespace, *, world_size: int) -> bool:
    """``--fsdp`` / ``--no-fsdp`` as given; by default on with more than one rank (``FSDP_BY_DEFAULT``).

    Why on: SP shards activations, not weights, so without FSDP every rank holds all weights, gradients and
    AdamW moments (16 bytes per parameter in fp32: 112 GB for a 7B model, beyond one GPU); FSDP2 divides them
    by the world size, for about 1.5x the gradient all-reduce's bytes (weights all-gathered per layer), which at
    long context is small beside the attention's KV traffic. Checkpoints are then written by every rank in
    parallel. One rank has nothing to shard over."""
    return args.fsdp if args.fsdp is not None else FSDP_BY_DEFAULT and world_size > 1


def validate_args(args: argparse.Namespace, *, world_size: int | None = None) -> None:
    """Every rank checks the options before any collective, so a typo fails everywhere at once.
    ``world_size``: default the initialised world's (or ``WORLD_SIZE``)."""
    from seqpar import strategies

    world_size = _world_size() if world_size is None else world_size
    softmax_choices = strategies.names("softmax") + ("auto",)
    linear_choices = strategies.names("linear")
    if args.model not in BUILTIN_MODELS and not Path(args.model).is_file():
        raise ValueError(
            f"--model: {args.model!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a config file"
        )
    if args.data not in DATA_KINDS and not Path(args.data).is_file():
        raise ValueError(f"--data: {args.data!r} is neither {', '.join(DATA_KINDS)} nor a .npy/.bin token file")
    if args.strategy not in softmax_choices:
        raise ValueError(f"--strategy: unknown {args.strategy!r}; choose one of {', '.join(softmax_choices)}")
    if args.linear_strategy not in linear_choices:
        raise ValueError(
            f"--linear-strategy: unknown {args.linear_strategy!r}; choose one of {', '.join(linear_choices)}"
        )
    for name in ("tokens_per_step", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.max_len < 2:
        raise ValueError(f"--max-len: must be >= 2 (a 1-token sequence has nothing to predict), got {args.max_len}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: must be finite and > 0, got {args.lr}")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay: must be finite and >= 0, got {args.weight_decay}")
    for name in ("checkpoint_every", "keep_last", "skip_nonfinite"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    if args.data_dtype is not None:
        if args.data in DATA_KINDS or not args.data.endswith(".bin"):
            raise ValueError(f"--data-dtype: only for .bin token files, not --data {args.data!r}")
        from seqpar.launch.data import _integer_dtype

        _integer_dtype(args.data_dtype)
    if args.resume and args.checkpoint_dir is None:
        raise ValueError("--resume: needs --checkpoint-dir")
    if args.dp < 1:
        raise ValueError(f"--dp: must be >= 1, got {args.dp}")
    if world_size % args.dp:
        raise ValueError(f"--dp: {args.dp} does not divide the world size {world_size}; pass a divisor (each "
                         "replica gets world/dp SP ranks)")
    if args.micro_batch_tokens is not None and args.micro_batch_tokens < 1:
        raise ValueError(f"--micro-batch-tokens: must be >= 1 tokens per rank, got {args.micro_batch_tokens}")


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
# training
# ---------------------------------------------------------------------------------------------------


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def train(args: argparse.Namespace) -> list[dict]:
    """Train as ``args`` say (every rank calls it); returns one record per step trained by this call.

    Raises:
        ValueError: a bad token file, checkpoint directory (a file, not writable, full, locked by another job,
            holding another run's checkpoints without ``--resume``) or checkpoint (corrupted, not loadable without
            running code, ``--steps`` below its step): on every rank, before training.
        NonFiniteLossError: more steps with a non-finite loss or gradient than ``--skip-nonfinite``.
        CheckpointError: a checkpoint stage failed or a rank did not arrive in time (names the stage and rank).
    """
    from seqpar.launch import checkpoint
    from seqpar.launch.data import make_source

    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(args.model, args.seed).to(device)
    vocab = model.config.vocab_size
    # Local checks, the same on every rank and before any collective, so a bad input fails everywhere at once.
    source = make_source(args.data, vocab=vocab, tokens_per_step=args.tokens_per_step, max_len=args.max_len,
                         seed=args.seed, dtype=args.data_dtype)
    if args.checkpoint_dir is not None:
        checkpoint.check_directory(args.checkpoint_dir, needed_bytes=checkpoint.estimated_size(model))
        latest = args.checkpoint_dir / "latest"
        if not args.resume and (latest.exists() or latest.is_symlink()):
            raise ValueError(f"--checkpoint-dir: {args.checkpoint_dir} already holds checkpoints of a run (it has "
                             "a 'latest'); pass --resume to continue it, or another directory to start over")
    lock = checkpoint.DirectoryLock(args.checkpoint_dir) if args.checkpoint_dir is not None and rank == 0 else None
    try:
        if args.checkpoint_dir is not None:
            error = None
            if lock is not None:  # rank 0 holds the lock for the whole run
                try:
                    lock.acquire()
                    for note in checkpoint.recover(args.checkpoint_dir):
                        print(f"seqpar-train: {args.checkpoint_dir}: {note}")
                except (ValueError, OSError) as err:
                    error = err
            checkpoint.agree("start: lock the checkpoint directory", error)
        return _train(args, model, source, device)
    finally:
        if lock is not None:
            lock.release()


def _resume(args: argparse.Namespace, model, optimizer, source) -> int:
    """Load the latest checkpoint (if any) on every rank; returns its step (0: none)."""
    from seqpar.launch import checkpoint

    path = checkpoint.latest_checkpoint(args.checkpoint_dir)
    if path is None:
        if dist.get_rank() == 0:
            print(f"seqpar-train: no checkpoint in {args.checkpoint_dir} yet; starting from step 0")
        return 0
    manifest = checkpoint.read_manifest(path)
    step = int(manifest["step"])
    if args.steps < step:
        raise ValueError(f"--steps: {args.steps} is below the step of the checkpoint {path} ({step}); pass --steps "
                         f">= {step} to continue it, or another --checkpoint-dir to start over (nothing was written)")
    checkpoint.load_checkpoint(path, model=model, optimizer=optimizer, seed=args.seed)
    source.load_state(manifest["data"])
    if dist.get_rank() == 0 and int(manifest["world_size"]) != dist.get_world_size():
        print(f"seqpar-train: {path} was written by {manifest['world_size']} ranks, resuming on "
              f"{dist.get_world_size()}: weights, optimizer and data position carry over; ranks without a saved "
              "RNG state get a seed derived from --seed, the step and the rank")
    return step


def _optimizer_overrides(args: argparse.Namespace, optimizer) -> dict:
    """Apply the optimizer settings given on the command line over the checkpoint's; returns the changes
    ``{name: [checkpoint's value, new value]}``."""
    changes = {}
    for name in OPTIMIZER_DEFAULTS:
        given = getattr(args, name)
        stored = optimizer.param_groups[0][name]
        if given is not None and given != stored:
            for group in optimizer.param_groups:
                group[name] = given
            changes[name] = [stored, given]
    return changes


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules of the classes transformers lists in ``_no_split_modules``.

    Raises:
        ValueError: the model names none (not a transformers model with decoder layers).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (transformers lists "
                         "them in _no_split_modules); pass --no-fsdp")
    return layers


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 over all ranks: ``fully_shard`` on each decoder layer, then the root (ZeRO-3; the SP groups run
    inside). Done before ``parallelize``, as its API asks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global gradient norm (a tensor on the gradients' device): FSDP2 gradients are DTensor shards, whose
    norm is reduced over the ranks by ``full_tensor``."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _drop_metrics_after(metrics: Path, step: int) -> int:
    """Remove the lines of steps after ``step`` (logged after the checkpoint a run resumes from, e.g. before a
    crash), so the resumed run does not log them twice; atomic replace. Returns how many were dropped."""
    if not metrics.is_file():
        return 0
    def logged_step(line: str) -> int:
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, TypeError, AttributeError):
            return 0  # not a step record (a torn last line, a note): kept as it is

    lines = metrics.read_text().splitlines()
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) != len(lines):
        tmp = metrics.with_name(metrics.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)
    return len(lines) - len(kept)


def _train(args: argparse.Namespace, model, source, device: torch.device) -> list[dict]:
    import seqpar
    from seqpar.collectives import count_comm
    from seqpar.launch import checkpoint
    from seqpar.launch.data import replica_batch

    rank, world = dist.get_rank(), dist.get_world_size()
    fsdp = resolve_fsdp(args, world_size=world)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fsdp:
        shard_model(model, device)
    parallel_options = {}
    replica = 0
    if args.dp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (args.dp, world // args.dp), mesh_dim_names=("dp", "sp"))
        parallel_options["mesh"] = mesh
        replica = mesh.get_local_rank("dp")
    sp_model = seqpar.parallelize(model, strategy=args.strategy, linear_strategy=args.linear_strategy,
                                  **parallel_options)
    if args.strategy == "auto" and args.calibrate is not None:
        from seqpar.launch.calibrate import calibrated_cost_model, use_cost_model

        use_cost_model(sp_model, calibrated_cost_model(sp_model, sp_model.config.cost_model, args.calibrate,
                                                       model_name=args.model, vocab_size=model.config.vocab_size,
                                                       device=device))
    # plan step t+1 while step t trains (rank 0, a background process); the data source knows its lengths
    plan_ahead = (args.strategy == "auto" and args.plan_ahead and args.dp == 1
                  and hasattr(source, "upcoming_lengths"))
    prepare_options = {} if args.micro_batch_tokens is None else {"max_tokens_per_rank": args.micro_batch_tokens}
    settings = {name: default if getattr(args, name) is None else getattr(args, name)
                for name, default in OPTIMIZER_DEFAULTS.items()}
    optimizer = torch.optim.AdamW(model.parameters(), **settings)

    start_step, overrides = 0, {}
    if args.resume:
        error, dropped = None, 0
        try:
            start_step = _resume(args, model, optimizer, source)
            if rank == 0 and args.metrics is not None:  # before the agreement: a failure here stops every rank
                dropped = _drop_metrics_after(args.metrics, start_step)
        except (ValueError, OSError) as err:
            error = err
        checkpoint.agree("start: resume from the latest checkpoint", error)
        overrides = _optimizer_overrides(args, optimizer) if start_step else {}
        if dropped:
            print(f"seqpar-train: dropped {dropped} line(s) of {args.metrics} logged after step {start_step} (the "
                  "checkpoint resumed from); those steps run again")
        if overrides and rank == 0:
            changed = ", ".join(f"--{k.replace('_', '-')} {new} (the checkpoint had {old})"
                                for k, (old, new) in overrides.items())
            print(f"seqpar-train: resuming at step {start_step} with {changed}")

    def save(step: int) -> None:
        checkpoint.save_checkpoint(args.checkpoint_dir, step, model=model, optimizer=optimizer,
                                   data_state=source.state(), keep_last=args.keep_last, sharded=fsdp)

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start_step, desc="seqpar-train", file=sys.stdout)
    history, skipped, saved = [], 0, start_step
    for step in range(start_step, args.steps):
        batch = [t.to(device) for t in source.next_batch()]
        mine = batch if args.dp == 1 else replica_batch(batch, replica=replica, replicas=args.dp)
        start = time.perf_counter()
        with count_comm() as stats:
            prepared = sp_model.prepare(mine, **prepare_options)
            if plan_ahead and step + 1 < args.steps:
                sp_model.plan_ahead(source.upcoming_lengths())
            # with a token budget, prepare gives a list of micro-batches, each normalised by the whole step's
            # tokens: their losses add up to the step's and their gradients accumulate to its gradient
            micro_batches = prepared if isinstance(prepared, list) else [prepared]
            step_loss = 0.0
            for local in micro_batches:
                out = sp_model(**local)
                out.loss.backward()
                step_loss = step_loss + out.loss.detach()
            if not fsdp:  # FSDP2 reduces the gradients in backward
                sp_model.sync_gradients()
        # The one host sync of the step (the log and the finiteness decision need both numbers); the loss (the
        # global token mean) and the reduced gradient norm are the same on every rank, so every rank decides alike.
        norm = _grad_norm(model).float().to(step_loss.device)
        loss_value, grad_norm = torch.stack([step_loss.float(), norm]).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        record = {
            "step": step + 1, "loss": loss_value, "tokens": sum(int(t.numel()) for t in batch),
            "sequences": len(batch), "seconds": elapsed, "bytes_sent_rank": stats.bytes_sent,
            "plan": _plan_summary(out), "peak_memory_bytes": _peak_memory_bytes(device),
        }
        record["tokens_per_s"] = record["tokens"] / elapsed
        if not finite:
            record["skipped_nonfinite"] = True
        if overrides and step == start_step:
            record["optimizer_overrides"] = overrides
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
        if skipped > args.skip_nonfinite:
            last = f"step_{saved}" if saved else "none"
            raise NonFiniteLossError(
                f"step {step + 1}: non-finite loss or gradient (loss {record['loss']}, gradient norm {grad_norm}); "
                f"stopped before the optimizer step, so no non-finite weights were applied or saved (last "
                f"checkpoint: {last}). Lower --lr, or pass --skip-nonfinite N to skip up to N such steps "
                f"({skipped} so far, {args.skip_nonfinite} allowed)")
        if args.checkpoint_dir is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save(step + 1)
            saved = step + 1
    if progress is not None:
        progress.close()
    if args.checkpoint_dir is not None and history and saved != args.steps:
        save(args.steps)
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
    from seqpar.collectives import comm
    from seqpar.launch.checkpoint import CheckpointError, agree

    # NCCL for the tensors on the GPU (the SP ops, FSDP, the loss totals), gloo for the few that must stay on the
    # host (the checkpoint agreement's messages): both on one group, each tensor takes its device's backend
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group(backend, timeout=comm.default_timeout())  # bounds every collective, torch's own too
    try:
        try:
            history = train(args)
        except ValueError as err:
            print(f"seqpar-train: error (rank {dist.get_rank()}): {err}", file=sys.stderr)
            return 2
        except (NonFiniteLossError, CheckpointError) as err:
            print(f"seqpar-train: error (rank {dist.get_rank()}): {err}", file=sys.stderr)
            return 1
        if dist.get_rank() == 0:
            print_summary(history, args)
        agree("finish", None)  # tearing gloo down while a peer still sends aborts that peer
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
