"""Turning a GLOBAL batch into one rank's inputs: label shift, padding to the layout's multiple, sharding,
global positions and ``cu_seqlens``.

Labels are shifted over the whole sequence BEFORE sharding (no label is lost at a shard edge); each sequence
is padded to the multiple the layout needs (padding carries label -100 and is never attended by real tokens).
A padded (B, S) batch with an ``attention_mask`` (left or right padding) is unpadded first and packed like a list
of sequences (``unpad``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.collectives import comm
from seqpar.collectives.layout import layout_multiple, shard_indices, validate_cu_seqlens

__all__ = ["IGNORE_INDEX", "StepShard", "pack_padded", "pack_sequences", "shift_labels", "split_batch", "unpad"]

IGNORE_INDEX = -100


@dataclass
class StepShard:
    """What ``prepare`` decided for this rank; passed back to the model's forward as ``seqpar_step``.

    Attributes:
        group: this rank's SP group for the step.
        group_ranks: the members of that group, as ranks of the parent group (``SPConfig.group``).
        softmax_strategy / linear_strategy: what the group's softmax / linear attention layers run (None: a kind
            the plan did not give this group).
        cu_seqlens: LOCAL int32 boundaries of a packed batch; None for a padded one.
        plan: the step's ``seqpar.solver.Plan`` (None for a fixed strategy).
        max_seqlen: the longest LOCAL sequence of ``cu_seqlens``, computed on the host when the batch is packed
            and validated (once per step), so that no layer reads ``cu_seqlens`` back; None for a padded batch.
        loss_normalizer: labelled tokens of the whole step over all replicas (a 0-dim tensor on the inputs'
            device), set when the step is split into micro-batches: each micro-batch's loss is divided by it.
            None: the forward's own labelled-token count.
        micro_batch: ``(index, count)`` of this micro-batch in its step (``(0, 1)``: the step is not split).
    """

    group: dist.ProcessGroup
    group_ranks: tuple[int, ...]
    softmax_strategy: str | None
    linear_strategy: str | None
    cu_seqlens: torch.Tensor | None
    plan: Any = None
    max_seqlen: int | None = None
    loss_normalizer: torch.Tensor | None = None
    micro_batch: tuple[int, int] = (0, 1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: position t predicts token t+1 of the SAME sequence; the last position predicts nothing."""
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def split_batch(batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """(sequences, labels, is_padded_batch) from any batch form ``SPModel.prepare`` accepts.

    Raises:
        ValueError: malformed batch (names the key), a padding attention_mask with holes, an empty batch.
    """
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("batch: empty list of sequences")
        for i, seq in enumerate(batch):
            if not isinstance(seq, torch.Tensor) or seq.dim() != 1 or seq.numel() == 0:
                raise ValueError(f"batch: item {i} must be a non-empty 1-D tensor of token ids")
        return list(batch), list(batch), False
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError(
            "batch: pass a dict with 'input_ids' (and optional 'labels', 'cu_seqlens') or a list of 1-D tensors"
        )
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    if labels.shape != ids.shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must equal input_ids' {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool((mask != 0).all()):
        if batch.get("cu_seqlens") is not None:
            raise ValueError("attention_mask: a packed batch (cu_seqlens) takes no padding mask; drop the padding")
        sequences, seq_labels = unpad(ids, labels, mask)
        return sequences, seq_labels, False
    if batch.get("cu_seqlens") is not None:
        flat_ids, flat_labels = ids.reshape(-1), labels.reshape(-1)
        bounds = validate_cu_seqlens(batch["cu_seqlens"], flat_ids.numel())
        pairs = [(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(bounds, bounds[1:])]
        return [p[0] for p in pairs], [p[1] for p in pairs], False
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"input_ids: expected a non-empty (B, S) tensor, got shape {tuple(ids.shape)}")
    return list(ids), list(labels), True


def unpad(ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The sequences of a padded (B, S) batch without their padding: row b keeps the tokens where ``mask[b]`` is
    nonzero, which must be one contiguous run (right padding, left padding, or both). The rows are then packed
    like a list of sequences, so each starts at position 0 and its labels are shifted within it, exactly as if
    it had been passed unpadded; the padding is neither attended nor labelled.

    Raises:
        ValueError: ``attention_mask: ...`` for a mask whose shape differs from input_ids', a row with no token,
            or a row whose kept tokens are not contiguous (a hole in the middle of a sequence).
    """
    if mask.shape != ids.shape or ids.dim() != 2:
        raise ValueError(f"attention_mask: shape {tuple(mask.shape)} must equal input_ids' (B, S) shape "
                         f"{tuple(ids.shape)}")
    keep = (mask != 0).cpu()  # the lengths size the packed batch: one host read per step
    lengths = keep.sum(dim=1)
    starts = keep.int().argmax(dim=1)
    sequences, seq_labels = [], []
    for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if length == 0:
            raise ValueError(f"attention_mask: row {row} masks every token; drop empty rows from the batch")
        if not bool(keep[row, start: start + length].all()):
            raise ValueError(
                f"attention_mask: row {row} has padding between tokens; only left or right padding (one "
                "contiguous run of ones per row) is supported"
            )
        sequences.append(ids[row, start: start + length])
        seq_labels.append(labels[row, start: start + length])
    return sequences, seq_labels


def pack_padded(
    sequences: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], *, layout: str, step: StepShard
) -> dict[str, Any]:
    """Equal-length sequences as one (B, S_local) batch of ``step.group``'s rank: every sequence padded at the end
    to the layout's multiple, then the same token positions taken from each.

    Returns ``{"input_ids", "position_ids", "labels"}`` (B, S_local) and ``"seqpar_step": step``.
    """
    _, rank, size = comm.group_info(step.group)
    ids = torch.stack(list(sequences))
    shifted = torch.stack([shift_labels(lab) for lab in labels])
    pad = (-ids.shape[1]) % layout_multiple(layout, size)
    if pad:
        ids = F.pad(ids, (0, pad))
        shifted = F.pad(shifted, (0, pad), value=IGNORE_INDEX)
    index = shard_indices(ids.shape[1], size, rank, layout=layout).to(ids.device)
    positions = index[None].expand(ids.shape[0], -1)
    return {"input_ids": ids[:, index], "position_ids": positions.contiguous(), "labels": shifted[:, index],
            "seqpar_step": step}


def pack_sequences(
    sequences: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], chosen: Sequence[int], *, layout: str,
    step: StepShard, device: torch.device,
) -> dict[str, Any]:
    """The ``chosen`` sequences packed into one (1, T_local) row of ``step.group``'s rank, each padded to the
    layout's multiple; ``step.cu_seqlens`` is set to the local boundaries and ``step.max_seqlen`` to the longest
    local sequence (from the host-side lengths). With no sequence chosen (a group the plan left idle, or an empty
    micro-batch) the group runs one placeholder sequence of padding (token 0, every label ignored): it adds nothing
    to the loss or the gradients, but every rank still runs the model's forward and backward, so collectives of
    wrappers (FSDP's all-gathers, DDP's hooks) stay matched across ranks."""
    _, rank, size = comm.group_info(step.group)
    multiple = layout_multiple(layout, size)
    if not chosen:
        sequences = [torch.zeros(multiple, dtype=torch.long, device=device)]
        labels = [torch.full((multiple,), IGNORE_INDEX, dtype=torch.long, device=device)]
        chosen = [0]
    ids, labs, pos, bounds = [], [], [], [0]
    for i in chosen:
        seq, lab = sequences[i], shift_labels(labels[i])
        pad = (-seq.numel()) % multiple
        ids.append(F.pad(seq, (0, pad)))
        labs.append(F.pad(lab, (0, pad), value=IGNORE_INDEX))
        pos.append(torch.arange(seq.numel() + pad, device=device))
        bounds.append(bounds[-1] + seq.numel() + pad)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cpu")  # host-side index math: built from Python ints
    index = shard_indices(bounds[-1], size, rank, layout=layout, cu_seqlens=cu).to(device)
    step.cu_seqlens = (cu // size).to(device=device, dtype=torch.int32)
    step.max_seqlen = max(b - a for a, b in zip(bounds, bounds[1:])) // size  # the hint every layer gets
    return {"input_ids": torch.cat(ids)[index][None], "position_ids": torch.cat(pos)[index][None],
            "labels": torch.cat(labs)[index][None], "seqpar_step": step}
