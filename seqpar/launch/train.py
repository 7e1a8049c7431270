"""seqpar-train: a torchrun training entry point for sequence-parallel causal-LM training.

    torchrun --nproc-per-node 4 -m seqpar.launch.train --model llama-tiny --data longtail --strategy auto \\
        --steps 20 --tokens-per-step 8192 --metrics run/metrics.jsonl --checkpoint-dir run/ckpt

Every rank builds the same model (seeded) and reads the same global batch each step; ``seqpar.parallelize``
shards it (``--dp N``: N data-parallel replicas, each training on its own part of the step's batch, on a
("dp", "sp") mesh). ``--fsdp`` (meant to be the default with more than one rank) shards weights, gradients and
optimizer state over all ranks with FSDP2; ``--activation-checkpointing`` recomputes each decoder layer in backward;
``--micro-batch-tokens N`` runs a step as micro-batches of at most N tokens per rank, accumulating gradients.
With ``--strategy auto`` rank 0 (with ``--dp``, each replica's first rank, for its part of the batch) plans step
t+1 in the background while step t trains, with a budget of a share of the step (5% on the CPU, whose cores the
solve shares with training; 50% beside a GPU; ``--no-plan-ahead``: inline), and ``--calibrate [FILE]`` plans with
a cost model fitted to this machine and to the run's own batches (profiled once, cached; without it the planner
assumes H100s).
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
DATA_KINDS = ("fixed", "uniform", "longtail", "bimodal")
# Optimizer settings that the command line may change on resume; None in the parsed options means "not given":
# a fresh run then uses the default, a resumed one keeps the checkpoint's value.
OPTIMIZER_DEFAULTS = {"lr": 3e-3, "weight_decay": 0.0}
# Whether --fsdp is on by default with more than one rank (why it is: ``resolve_fsdp``).
FSDP_BY_DEFAULT = True


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient more often than ``--skip-nonfinite`` allows."""


DEFAULT_CALIBRATION = Path("seqpar-calibration.json")
# The first steps --calibrate times every static plan on: ~2 min on 4 CPU ranks. 6, not 3: each shape's scale is a
# mean over them, and replayed on two timings of held-out long-tail steps (bench/static_choice.py) 6 picked shapes
# 0.5-1% faster at the median than 3 (1.010 and 0.998 of the best static configuration, against 1.005 and 0.988).
CALIBRATION_BATCHES = 6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar-train", description="Sequence-parallel causal-LM training (torchrun).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama-tiny",
                   help=f"{' | '.join(BUILTIN_MODELS)}, a transformers config JSON (random weights) or a model "
                   "directory (config.json + safetensors: the pretrained weights, from_pretrained)")
    p.add_argument("--data", default="longtail", help=f"{' | '.join(DATA_KINDS)} (synthetic), a .npy/.bin token "
                   "file, or raw text: a .jsonl / .parquet / .txt file, a directory of them, or a datasets "
                   "save_to_disk directory (tokenized once into --data-cache)")
    p.add_argument("--data-dtype", default=None, help="how a headerless .bin file stores ids: uint16 (nanoGPT), "
                   "uint32, int32, int64 (required for .bin)")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="tokens in each global batch")
    p.add_argument("--max-len", type=int, default=2048, help="longest sequence (synthetic data is clipped to it)")
    p.add_argument("--strategy", default="auto", help="softmax-attention SP: auto (planned per step) or a registered "
                   "strategy (seqpar.strategies: ring, token_ring, ulysses, allgather_kv, usp)")
    p.add_argument("--linear-strategy", default="zeco", help="linear-attention SP: a registered linear strategy "
                   "(zeco, lasp2), for models with linear attention")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of the run (on --resume: the total, "
                   "counting the checkpoint's)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW peak learning rate (None: "
                   f"{OPTIMIZER_DEFAULTS['lr']}, or on --resume the checkpoint's)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (None: 0, or on --resume "
                   "the checkpoint's)")
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
                   "every group shape at 256, 1024 and 4096 tokens, then every static plan timed on the run's first "
                   f"{CALIBRATION_BATCHES} batches; run once and cached in FILE; default {DEFAULT_CALIBRATION})")
    p.add_argument("--plan-ahead", action=argparse.BooleanOptionalAction, default=True,
                   help="with --strategy auto: plan step t+1 in the background while step t trains, within a "
                   "share of the step's time (default on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, the synthetic data and the "
                   "document order")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="directory of the run's checkpoints (None: "
                   "no checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end; "
                   "the last step is always saved)")
    p.add_argument("--keep-last", type=int, default=3, help="keep the K newest checkpoints (0: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint; --steps "
                   "below its step is refused")
    p.add_argument("--metrics", type=Path, default=None, help="JSONL file, one line per step (rank 0)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the loss curve (rank 0, needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    add_text_data_options(p)
    add_schedule_options(p)
    add_output_options(p)
    return p


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR_SCHEDULES = ("constant", "linear", "cosine")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (pretrained weights, precision, long-context overrides)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="compute precision. bf16: fp32 master "
                   "weights and AdamW state, bf16 compute (FSDP2 MixedPrecisionPolicy: bf16 parameters all-gathered "
                   "per layer, gradients reduced in fp32; torch.autocast without --fsdp)")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="override the config's context length "
                   "before the model is built (None: the config's)")
    g.add_argument("--rope-theta", type=float, default=None, help="override the RoPE base (None: the config's)")
    g.add_argument("--rope-scaling", type=_json_value, default=None, help="RoPE scaling as JSON, merged into the "
                   "config's rope parameters, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                   "\"original_max_position_embeddings\": 4096}' (None: the config's)")


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}); quote it for the shell, e.g. "
                                         "'{\"rope_type\": \"linear\", \"factor\": 4.0}'") from err


def add_text_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text data (--data / --eval-data as raw text)")
    g.add_argument("--text-field", default="text", help="the JSON field / column holding each document's text")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (None: the --model directory)")
    g.add_argument("--data-cache", type=Path, default=None, help="token cache directory (None: $SEQPAR_CACHE/tokens "
                   "or ~/.cache/seqpar/tokens)")
    g.add_argument("--packing", action="store_true", help="concatenate documents into rows of --max-len tokens "
                   "(EOS-separated) instead of one variable-length sequence per document")
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True, help="a seeded document order, "
                   "new each epoch (--no-shuffle: file order)")


def add_schedule_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning-rate schedule and clipping")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0 to --lr over N steps")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="after warmup: constant, linear "
                   "to 0 or cosine to 0 at --steps (transformers' schedules)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (over all ranks and "
                   "shards, as clip_grad_norm_) to this; 0: off")


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export, evaluation and logging")
    g.add_argument("--export-hf", type=Path, default=None, help="after training, write a Hugging Face model "
                   "directory (save_pretrained, safetensors, in --dtype) with the tokenizer (None: no export)")
    g.add_argument("--eval-data", default=None, help="held-out data (any --data form) for the evaluation loss, "
                   "computed through the same SP path (None: no evaluation)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: only after the last "
                   "step)")
    g.add_argument("--eval-batches", type=int, default=1, help="batches of --tokens-per-step in one evaluation "
                   "(the first of --eval-data, in file order)")
    g.add_argument("--tensorboard", type=Path, default=None, help="TensorBoard log directory (rank 0; loss, "
                   "learning rate, gradient norm, tokens/s, evaluation loss) besides --metrics (None: off)")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse on every rank; under torchrun only rank 0 prints (``--help``, a usage error), so a 64-rank job
    prints its help once."""
    import contextlib
    import io

    parser = build_parser()
    if int(os.environ.get("RANK", "0")) == 0:
        return parser.parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return parser.parse_args(argv)


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
    model_dir = Path(args.model).is_dir()
    if model_dir and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model: the directory {args.model!r} has no config.json (save the model with "
                         "save_pretrained, or pass its config JSON)")
    if args.model not in BUILTIN_MODELS and not Path(args.model).is_file() and not model_dir:
        raise ValueError(
            f"--model: {args.model!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}), a config file nor a "
            "model directory"
        )
    _validate_data(args, model_dir=model_dir)
    _validate_new_options(args)
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


def _validate_data(args: argparse.Namespace, *, model_dir: bool) -> None:
    from seqpar.launch.text_data import is_text_data, text_files

    for argument, data in (("--data", args.data), ("--eval-data", args.eval_data)):
        if data is None or data in DATA_KINDS:
            if argument == "--eval-data" and data is not None:
                raise ValueError(f"--eval-data: {data!r} is synthetic; pass held-out text or a token file")
            continue
        if is_text_data(data):
            text_files(data, argument=argument)  # exists, readable kinds
            if args.tokenizer is None and not model_dir:
                raise ValueError(f"{argument}: raw text needs a tokenizer: pass --tokenizer DIR, or a --model "
                                 "directory that holds one")
        elif not Path(data).is_file():
            raise ValueError(f"{argument}: {data!r} is neither {', '.join(DATA_KINDS)}, a .npy/.bin token file "
                             "nor text (.jsonl / .parquet / .txt, a directory, a datasets directory)")
    text = args.data not in DATA_KINDS and is_text_data(args.data)
    if (args.packing or not args.shuffle) and not text:
        raise ValueError("--packing/--no-shuffle: only for raw-text --data")


def _validate_new_options(args: argparse.Namespace) -> None:
    """The checks of the model, schedule and output options (every rank, before any collective)."""
    for name in ("warmup_steps", "eval_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    if args.eval_batches < 1:
        raise ValueError(f"--eval-batches: must be >= 1, got {args.eval_batches}")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        raise ValueError(f"--grad-clip: must be finite and >= 0 (0: off), got {args.grad_clip}")
    if args.max_position_embeddings is not None and args.max_position_embeddings < args.max_len:
        raise ValueError(f"--max-position-embeddings: {args.max_position_embeddings} is below --max-len "
                         f"{args.max_len}; raise it (or lower --max-len)")
    if args.rope_theta is not None and not (math.isfinite(args.rope_theta) and args.rope_theta > 0):
        raise ValueError(f"--rope-theta: must be finite and > 0, got {args.rope_theta}")
    if args.rope_scaling is not None and not isinstance(args.rope_scaling, dict):
        raise ValueError(f"--rope-scaling: must be a JSON object such as '{{\"rope_type\": \"linear\", "
                         f"\"factor\": 4.0}}', got {args.rope_scaling!r}")
    if args.eval_every and args.eval_data is None:
        raise ValueError("--eval-every: needs --eval-data")
    if args.tensorboard is not None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard: needs the tensorboard package (pip install 'seqpar[train]')")
    if args.export_hf is not None:
        from seqpar.launch.export import check_export_dir

        check_export_dir(args.export_hf)


def _config_overrides(args: argparse.Namespace) -> dict:
    return {"max_position_embeddings": args.max_position_embeddings, "rope_theta": args.rope_theta,
            "rope_scaling": args.rope_scaling}


def apply_config_overrides(config, *, max_position_embeddings: int | None = None, rope_theta: float | None = None,
                           rope_scaling: dict | None = None) -> None:
    """Set the long-context knobs on a transformers config before the model is built (None: keep). transformers
    5 keeps RoPE settings in ``config.rope_parameters`` (4.x: ``rope_theta`` / ``rope_scaling``)."""
    if max_position_embeddings is not None:
        config.max_position_embeddings = max_position_embeddings
    if rope_theta is None and rope_scaling is None:
        return
    if hasattr(config, "rope_parameters"):
        params = dict(config.rope_parameters or {})
        params.update(rope_scaling or {})
        if rope_theta is not None:
            params["rope_theta"] = rope_theta
        config.rope_parameters = params
    else:
        if rope_theta is not None:
            config.rope_theta = rope_theta
        if rope_scaling is not None:
            config.rope_scaling = rope_scaling


def build_model(name: str, seed: int, **overrides) -> torch.nn.Module:
    """The model of ``--model``: a built-in, a config JSON (random weights, seeded) or a model directory
    (``from_pretrained``: the pretrained weights, loaded in fp32 as the master weights). ``overrides``:
    ``apply_config_overrides``' keywords, applied to the config before the model is built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if Path(name).is_dir():
        config = AutoConfig.from_pretrained(name)
        apply_config_overrides(config, **overrides)
        has_weights = any(Path(name).glob("*.safetensors")) or any(Path(name).glob("*.bin"))
        if has_weights:
            return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
    return _build_from_name(name, seed, overrides)


def _build_from_name(name: str, seed: int, overrides: dict) -> torch.nn.Module:
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
    apply_config_overrides(config, **overrides)
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
    from seqpar.launch.text_data import TextTokens, is_text_data

    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(args.model, args.seed, **_config_overrides(args)).to(device)
    vocab = model.config.vocab_size
    # Local checks, the same on every rank and before any collective, so a bad input fails everywhere at once.
    # Raw text is tokenized after the checkpoint checks (one process per node writes the token cache).
    text = args.data not in DATA_KINDS and is_text_data(args.data)
    source = None if text else make_source(args.data, vocab=vocab, tokens_per_step=args.tokens_per_step,
                                           max_len=args.max_len, seed=args.seed, dtype=args.data_dtype)
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
        if source is None:
            source = TextTokens(_open_text(args, args.data, "--data", vocab), tokens_per_step=args.tokens_per_step,
                                max_len=args.max_len, packing=args.packing, seed=args.seed, shuffle=args.shuffle)
        return _train(args, model, source, device)
    finally:
        if lock is not None:
            lock.release()


def _tokenizer_path(args: argparse.Namespace) -> str | None:
    if args.tokenizer is not None:
        return args.tokenizer
    return args.model if Path(args.model).is_dir() else None


def _open_text(args: argparse.Namespace, data: str, argument: str, vocab: int):
    """The tokenized corpus of ``data``: the first process of each node (``LOCAL_RANK`` 0) tokenizes what the
    cache lacks, the others wait for it (``checkpoint.agree``, bounded by ``SEQPAR_COMM_TIMEOUT_S``: pre-build a
    large corpus' cache with ``python -m seqpar.launch.text_data``) and read the cache."""
    from seqpar.launch import checkpoint
    from seqpar.launch.text_data import open_corpus

    options = {"tokenizer_path": _tokenizer_path(args), "vocab": vocab, "text_field": args.text_field,
               "cache_dir": args.data_cache, "argument": argument}
    builder = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    corpus, error = None, None
    if builder:
        try:
            corpus = open_corpus(data, build=True, **options)
        except (ValueError, OSError) as err:
            error = err
    checkpoint.agree(f"start: tokenize {argument} {data}", error)
    return corpus if corpus is not None else open_corpus(data, build=False, **options)


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
        # the learning rate a schedule scales is the group's initial_lr (its "lr" is the scheduled one)
        key = "initial_lr" if name == "lr" and "initial_lr" in optimizer.param_groups[0] else name
        stored = optimizer.param_groups[0][key]
        if given is not None and given != stored:
            for group in optimizer.param_groups:
                group[key] = group[name] = given
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


def shard_model(model: torch.nn.Module, device: torch.device, *, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over all ranks: ``fully_shard`` on each decoder layer, then the root (ZeRO-3; the SP groups run
    inside). Done before ``parallelize``, as its API asks. ``param_dtype`` (e.g. bf16): the dtype parameters are
    all-gathered and computed in, with fp32 gradient reduction (``MixedPrecisionPolicy``); None: as stored."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)


def clip_gradients(model: torch.nn.Module, max_norm: float, total_norm: float) -> float:
    """Scale every gradient by ``min(1, max_norm / (total_norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
    does, given the global norm over all ranks and shards (``_grad_norm``; the same on every rank). Returns the
    factor. A host number, because the step already synchronised for the loss log: no second reduction."""
    factor = min(1.0, max_norm / (total_norm + 1e-6))
    if factor < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    return factor


def lr_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int,
                 start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warmup schedule ``schedule`` (constant / linear / cosine to 0 at ``total_steps``), positioned
    at ``start_step`` (a resumed run): the rate of step s is the group's ``initial_lr`` (the peak --lr) times the
    schedule's factor at s, whatever the world size or resume point."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    for group in optimizer.param_groups:  # a checkpoint of a run without a schedule has no initial_lr
        group.setdefault("initial_lr", group["lr"])
    last = start_step - 1
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps, last_epoch=last)
    make = get_linear_schedule_with_warmup if schedule == "linear" else get_cosine_schedule_with_warmup
    return make(optimizer, warmup_steps, total_steps, last_epoch=last)


def cost_model_options(model: torch.nn.Module, *, strategy: str, world_size: int) -> dict:
    """``parallelize``'s ``cost_model`` for ``strategy="auto"`` when the ``world_size`` ranks one plan runs on
    (all, or one ``--dp`` replica's consecutive block) span several nodes: the default model with the launcher's
    node size (``LOCAL_WORLD_SIZE``, set by torchrun) as the ranks per node, so the planner keeps each SP group
    inside one node or makes it of whole nodes. ``{}`` (the default) within one node."""
    from dataclasses import replace

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if strategy != "auto" or local >= world_size:
        return {}
    from seqpar.solver import CostModel
    from seqpar.wrapper import default_cost_model

    base = default_cost_model(model, world_size)
    return {"cost_model": CostModel(replace(base.cluster, gpus_per_node=local), base.model)}


def _calibration_batches(args: argparse.Namespace, source, replica: int) -> list[list[int]]:
    """The sequence lengths of the run's first ``CALIBRATION_BATCHES`` steps (this replica's part with ``--dp``),
    read without moving the data position: ``--calibrate`` times every static plan on them."""
    from seqpar.launch.data import replica_indices

    saved = source.state()
    batches = []
    for _ in range(CALIBRATION_BATCHES):
        lengths = [int(t.numel()) for t in source.next_batch()]
        if args.dp > 1:
            lengths = [lengths[i] for i in replica_indices(lengths, replica=replica, replicas=args.dp)]
        batches.append(lengths)
    source.load_state(saved)
    return batches


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


def _eval_batches(args: argparse.Namespace, vocab: int) -> list[list[torch.Tensor]]:
    """The ``--eval-batches`` batches of ``--eval-data`` (documents in file order, the same at every evaluation)."""
    from seqpar.launch.data import make_source
    from seqpar.launch.text_data import TextTokens, is_text_data

    if is_text_data(args.eval_data):
        corpus = _open_text(args, args.eval_data, "--eval-data", vocab)
        source = TextTokens(corpus, tokens_per_step=args.tokens_per_step, max_len=args.max_len,
                            packing=args.packing, seed=args.seed, shuffle=False)
    else:
        source = make_source(args.eval_data, vocab=vocab, tokens_per_step=args.tokens_per_step,
                             max_len=args.max_len, seed=args.seed, dtype=args.data_dtype)
    return [source.next_batch() for _ in range(args.eval_batches)]


def _tensorboard_writer(directory: Path | None):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``directory`` (None: no TensorBoard log; ``validate_args``
    checked that tensorboard imports)."""
    if directory is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(directory))


def _train(args: argparse.Namespace, model, source, device: torch.device) -> list[dict]:
    import contextlib

    import seqpar
    from seqpar.collectives import count_comm
    from seqpar.launch import checkpoint
    from seqpar.launch.data import replica_batch, replica_indices

    rank, world = dist.get_rank(), dist.get_world_size()
    fsdp = resolve_fsdp(args, world_size=world)
    compute_dtype = DTYPES[args.dtype]
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fsdp:
        shard_model(model, device, param_dtype=None if compute_dtype == torch.float32 else compute_dtype)

    def compute_precision():
        # bf16 with fp32 master weights: FSDP2's MixedPrecisionPolicy casts the gathered parameters; without FSDP,
        # autocast runs the matmuls (and so the attention inputs) in bf16
        if compute_dtype == torch.float32 or fsdp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=compute_dtype)

    parallel_options = cost_model_options(model, strategy=args.strategy, world_size=world // args.dp)
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
                                                       device=device,
                                                       batches=_calibration_batches(args, source, replica)))
    # plan step t+1 while step t trains (rank 0, a background process); the data source knows its lengths
    # (with --dp, each replica's first rank plans that replica's part of the next step)
    plan_ahead = args.strategy == "auto" and args.plan_ahead and hasattr(source, "upcoming_lengths")
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
    scheduler = lr_scheduler(optimizer, schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                             total_steps=args.steps, start_step=start_step)
    eval_batches = _eval_batches(args, model.config.vocab_size) if args.eval_data is not None else None

    def run_batch(batch: list[torch.Tensor], *, backward: bool, plan_next: bool = False) -> tuple[torch.Tensor, Any]:
        """The global token-mean loss of ``batch`` through the SP path (gradients accumulated if ``backward``);
        ``plan_next``: once this step's plan is in use, start planning the next batch (solved while this one
        trains)."""
        mine = batch if args.dp == 1 else replica_batch(batch, replica=replica, replicas=args.dp)
        prepared = sp_model.prepare(mine, **prepare_options)
        if plan_next:
            upcoming = source.upcoming_lengths()
            if args.dp > 1 and len(upcoming) >= args.dp:  # (fewer: the next step raises replica_batch's error)
                upcoming = [upcoming[i] for i in replica_indices(upcoming, replica=replica, replicas=args.dp)]
            sp_model.plan_ahead(upcoming)
        # with a token budget, prepare gives a list of micro-batches, each normalised by the whole step's
        # tokens: their losses add up to the step's and their gradients accumulate to its gradient
        micro_batches = prepared if isinstance(prepared, list) else [prepared]
        total, out = 0.0, None
        for local in micro_batches:
            with compute_precision():
                out = sp_model(**local)
            if backward:
                out.loss.backward()
            total = total + out.loss.detach().float()
        return total, out

    def evaluate() -> float:
        """The token mean of the loss over every evaluation batch (each batch's loss is its token mean)."""
        weighted, labelled = 0.0, 0
        with torch.no_grad():
            for batch in eval_batches:
                loss, _ = run_batch([t.to(device) for t in batch], backward=False)
                count = sum(int(t.numel()) - 1 for t in batch)
                weighted, labelled = weighted + loss * count, labelled + count
        return float(weighted / labelled)

    def save(step: int) -> None:
        checkpoint.save_checkpoint(args.checkpoint_dir, step, model=model, optimizer=optimizer,
                                   data_state=source.state(), keep_last=args.keep_last, sharded=fsdp)

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start_step, desc="seqpar-train", file=sys.stdout)
    writer = _tensorboard_writer(args.tensorboard) if rank == 0 else None
    history, skipped, saved = [], 0, start_step
    try:
        for step in range(start_step, args.steps):
            batch = [t.to(device) for t in source.next_batch()]
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            with count_comm() as stats:
                step_loss, out = run_batch(batch, backward=True, plan_next=plan_ahead and step + 1 < args.steps)
                if not fsdp:  # FSDP2 reduces the gradients in backward
                    sp_model.sync_gradients()
            # The one host sync of the step (the log, the finiteness decision and the clipping factor need both
            # numbers); the loss (the global token mean) and the reduced gradient norm are the same on every
            # rank, so every rank decides alike.
            norm = _grad_norm(model).float().to(step_loss.device)
            loss_value, grad_norm = torch.stack([step_loss, norm]).tolist()
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if finite:
                if args.grad_clip:
                    clip_gradients(model, args.grad_clip, grad_norm)
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            elapsed = time.perf_counter() - start
            record = {
                "step": step + 1, "loss": loss_value, "tokens": sum(int(t.numel()) for t in batch),
                "sequences": len(batch), "seconds": elapsed, "bytes_sent_rank": stats.bytes_sent,
                "plan": _plan_summary(out), "peak_memory_bytes": _peak_memory_bytes(device),
                "lr": lr, "grad_norm": grad_norm, "data": source.state(),
            }
            if out.plan is not None:
                record["plan_ranks"] = [list(g.ranks) for g in out.plan.groups]
            if plan_ahead and sp_model.runner.rank == 0:  # the rank that plans (each replica's first): how long
                # this step waited for its plan, the budget the next step's solve got, and how many steps so far
                # ran a plan made ahead (the first plans inline)
                runner = sp_model.runner
                record["plan_wait_s"], record["plan_budget_s"] = runner.last_plan_wait_s, runner.last_plan_budget_s
                record["plans_from_ahead"] = runner.plans_from_ahead
            if "cost_model" in parallel_options:  # several nodes: the planner kept groups node-aligned
                record["ranks_per_node"] = parallel_options["cost_model"].cluster.gpus_per_node
            record["tokens_per_s"] = record["tokens"] / elapsed
            if not finite:
                record["skipped_nonfinite"] = True
            if overrides and step == start_step:
                record["optimizer_overrides"] = overrides
            if eval_batches is not None and (step + 1 == args.steps or (args.eval_every and
                                                                       (step + 1) % args.eval_every == 0)):
                record["eval_loss"] = evaluate()
            history.append(record)
            if rank == 0:
                _log(record, args.metrics, writer)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                         plan=record["plan"])
                    progress.update(1)
            if skipped > args.skip_nonfinite:
                last = f"step_{saved}" if saved else "none"
                raise NonFiniteLossError(
                    f"step {step + 1}: non-finite loss or gradient (loss {record['loss']}, gradient norm "
                    f"{grad_norm}); stopped before the optimizer step, so no non-finite weights were applied or "
                    f"saved (last checkpoint: {last}). Lower --lr, or pass --skip-nonfinite N to skip up to N such "
                    f"steps ({skipped} so far, {args.skip_nonfinite} allowed)")
            if args.checkpoint_dir is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                save(step + 1)
                saved = step + 1
    finally:
        if writer is not None:
            writer.close()
    if progress is not None:
        progress.close()
    if args.checkpoint_dir is not None and history and saved != args.steps:
        save(args.steps)
    if args.export_hf is not None:
        _export(args, model, compute_dtype)
    return history


def _log(record: dict, metrics: Path | None, writer) -> None:
    """Rank 0: one JSON line in ``--metrics``, scalars in TensorBoard."""
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        with metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if writer is not None:
        for name in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"):
            if name in record:
                writer.add_scalar(f"train/{name}" if name != "eval_loss" else "eval/loss", record[name],
                                  record["step"])
        writer.flush()


def _export(args: argparse.Namespace, model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``--export-hf``: gather the weights (every rank), rank 0 writes; every rank learns whether it worked."""
    from seqpar.launch import checkpoint
    from seqpar.launch.export import export_hf

    error = None
    try:
        path = export_hf(model, args.export_hf, dtype=dtype, tokenizer_path=_tokenizer_path(args))
        if path is not None:
            print(f"seqpar-train: exported {path} (AutoModelForCausalLM.from_pretrained loads it)")
    except (OSError, ValueError) as err:
        error = err
    checkpoint.agree("export: write the Hugging Face model", error)


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
    args = _parse_args(argv)
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
