"""Per-step execution state: which SP group, strategy and packed layout the attention calls of the current
forward use.

``parallelize`` enters an ``SPContext`` around the wrapped model's forward; every interception point (the
Hugging Face attention function, the SDPA interceptor, module adapters) calls ``softmax_attention`` or
``linear_attention`` here, which dispatch to the SP op the context names. Outside a context they raise: an
attention call that reaches seqpar without a plan would silently compute local-only attention otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

SOFTMAX_STRATEGIES = {
    "ring": ("seqpar.collectives.ring", "ring_attention"),
    "token_ring": ("seqpar.collectives.token_ring", "token_ring_attention"),
    "ulysses": ("seqpar.collectives.ulysses", "ulysses_attention"),
    "allgather_kv": ("seqpar.collectives.allgather_kv", "allgather_kv_attention"),
}
LINEAR_STRATEGIES = {
    "lasp2": ("seqpar.collectives.lasp2", "lasp2_linear_attention"),
    "zeco": ("seqpar.collectives.zeco", "zeco_linear_attention"),
}


def resolve_op(table: dict[str, tuple[str, str]], name: str, argument: str):
    """The SP op function for strategy ``name``; ValueError naming ``argument`` if unknown."""
    if name not in table:
        raise ValueError(f"{argument}: unknown strategy {name!r}; choose one of {sorted(table)}")
    module, attr = table[name]
    return getattr(importlib.import_module(module), attr)


@dataclass
class SPContext:
    """What one forward of one rank runs with.

    Attributes:
        group: this rank's SP group for the step.
        strategy / linear_strategy: the SP ops for softmax and linear attention layers.
        layout: how tokens were sharded (``zigzag`` or ``contiguous``).
        cu_seqlens: LOCAL int32 boundaries when the batch is packed (input of shape (1, T_local)); None for a
            padded (B, S_local) batch.
        backend: kernel backend.
        calls: number of attention calls routed in this forward (a forward with none is an error).
    """

    group: dist.ProcessGroup
    strategy: str
    linear_strategy: str
    layout: str
    cu_seqlens: torch.Tensor | None
    backend: str = "auto"
    calls: int = 0


_active: list[SPContext] = []


@contextlib.contextmanager
def sp_context(ctx: SPContext) -> Iterator[SPContext]:
    _active.append(ctx)
    try:
        yield ctx
    finally:
        _active.pop()


def current_context() -> SPContext | None:
    return _active[-1] if _active else None


def _require_context(what: str) -> SPContext:
    ctx = current_context()
    if ctx is None:
        raise RuntimeError(
            f"seqpar: {what} was called outside a seqpar-parallelized forward; call the model returned by "
            "seqpar.parallelize(...) with the output of its .prepare(batch)"
        )
    return ctx


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None
) -> torch.Tensor:
    """Route one softmax attention call of the model: q (B, S_local, H, D), k/v (B, S_local, H_kv, D)."""
    ctx = _require_context("attention")
    ctx.calls += 1
    op = resolve_op(SOFTMAX_STRATEGIES, ctx.strategy, "strategy")
    options = dict(group=ctx.group, causal=causal, softmax_scale=scale, layout=ctx.layout, backend=ctx.backend)
    if ctx.cu_seqlens is None:
        return op(q, k, v, **options)
    if q.shape[0] != 1:
        raise ValueError(f"q: a packed batch has batch size 1, got {q.shape[0]}")
    return op(q[0], k[0], v[0], cu_seqlens=ctx.cu_seqlens, **options)[None]


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, log_decay: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """Route one linear attention call: q, k (B, S_local, H, Dk), v (B, S_local, H, Dv). Packed batches run
    sequence by sequence, since a sequence's state must not flow into the next one."""
    ctx = _require_context("linear attention")
    ctx.calls += 1
    if ctx.layout != "contiguous":
        raise ValueError(
            "layout: linear attention needs the contiguous layout (its state flows left to right); "
            "parallelize(..., layout='contiguous') or leave layout='auto'"
        )
    op = resolve_op(LINEAR_STRATEGIES, ctx.linear_strategy, "linear_strategy")
    if ctx.cu_seqlens is None:
        return op(q, k, v, log_decay=log_decay, group=ctx.group, scale=scale)
    if log_decay is not None and log_decay.dim() != 1:
        raise ValueError("log_decay: packed batches support per-head (H,) decay only in the adapter path")
    bounds = ctx.cu_seqlens.tolist()
    outs = [
        op(q[:, a:b], k[:, a:b], v[:, a:b], log_decay=log_decay, group=ctx.group, scale=scale)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(outs, dim=1)
