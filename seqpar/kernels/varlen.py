"""Packed variable-length batches: the one check of ``cu_seqlens`` that every layer uses.

A packed batch puts the tokens of all sequences on one dim; int32 ``cu_seqlens`` [0, len_0, len_0 + len_1, ...]
says where each sequence starts and ends. The layouts (``collectives.layout``), the SP ops
(``collectives.softmax_common``) and the kernel wrappers (Triton) all check it here, so they agree on what is
valid and say it in the same words.
"""

from __future__ import annotations

from itertools import pairwise

import torch

__all__ = ["validate_cu_seqlens"]


def validate_cu_seqlens(
    cu_seqlens: torch.Tensor, total: int | None = None, *, name: str = "cu_seqlens", allow_empty: bool = False
) -> list[int]:
    """Check packed-batch boundaries and return them as a Python list.

    Args:
        cu_seqlens: 1-D int32 tensor of cumulative lengths, any stride, any device.
        total: the number of packed tokens the last entry must equal (not checked when None).
        name: the argument name the error messages use (``cu_seqlens_q`` in the kernels).
        allow_empty: accept zero-length sequences and a batch of no sequences (``[0]``): the kernels can run
            those; the SP layouts cannot (every rank needs a share of every sequence).

    Raises:
        ValueError: naming ``name``: not a 1-D int32 tensor, too few entries, does not start at 0, decreasing
            (or, without ``allow_empty``, not strictly increasing), or a last entry other than ``total``.
    """
    min_entries = 1 if allow_empty else 2
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < min_entries:
        raise ValueError(
            f"{name}: expected a 1-D tensor [0, len_0, len_0+len_1, ...] with at least {min_entries} entries"
        )
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name}: must be int32 (got {cu_seqlens.dtype}); use {name}.to(torch.int32)")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name}: must start at 0 (got {bounds[0]})")
    if allow_empty and any(b < a for a, b in pairwise(bounds)):
        raise ValueError(f"{name}: must not decrease, got {bounds[:16]}")
    if not allow_empty and any(b <= a for a, b in pairwise(bounds)):
        raise ValueError(f"{name}: must be strictly increasing (every sequence at least one token), got {bounds}")
    if total is not None and bounds[-1] != total:
        raise ValueError(f"{name}: last entry {bounds[-1]} must equal the number of tokens {total}")
    return bounds
