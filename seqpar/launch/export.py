"""Export a trained (possibly FSDP2-sharded) model as a Hugging Face model directory (seqpar-train --export-hf).

The full state dict is gathered from the shards with ``torch.distributed.checkpoint.state_dict`` (a collective;
rank 0 receives it on the CPU), loaded into a clean copy of the architecture built on the meta device (so rank 0
holds the weights once), and written with ``save_pretrained`` (safetensors) next to the tokenizer's
``save_pretrained`` files. The directory is written under a temporary name and renamed when complete.
``AutoModelForCausalLM.from_pretrained(out)`` then loads the trained model.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["export_hf", "check_export_dir"]

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def check_export_dir(out: Path) -> None:
    """Refuse an existing non-empty ``--export-hf`` directory before training (nothing is overwritten).

    Raises:
        ValueError: ``out`` is a file or a non-empty directory.
    """
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ValueError(f"--export-hf: {out} exists and is not empty; pass a new directory (nothing is overwritten)")


def export_hf(model: torch.nn.Module, out: Path, *, dtype: torch.dtype = torch.float32,
              tokenizer_path: str | Path | None = None) -> Path | None:
    """Write ``model`` (every rank calls this: the gather is a collective) to ``out`` on rank 0.

    Args:
        model: the transformers model that was trained (FSDP2-sharded or whole on every rank).
        out: the directory to create.
        dtype: the dtype of the saved weights (and the config's ``dtype``).
        tokenizer_path: a tokenizer directory to save beside the weights (None: no tokenizer).

    Returns:
        ``out`` on rank 0, None elsewhere. Rank 0 writes; call ``checkpoint.agree`` after it so the others
        wait for (and learn of a failure of) the write.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    config = copy.deepcopy(model.config)
    config.dtype = DTYPE_NAMES[dtype]
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in full.items()}
    clean.load_state_dict(state, strict=True, assign=True)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_path)).save_pretrained(tmp)
    if out.is_dir():
        out.rmdir()  # empty (check_export_dir)
    tmp.rename(out)
    return out
