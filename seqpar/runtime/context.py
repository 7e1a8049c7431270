"""Per-step execution state: which SP group, strategies and packed layout the attention calls of the current
forward use.

``SPModel.forward`` enters an ``SPContext`` around the wrapped model's forward; every interception point (the
Hugging Face attention function, the SDPA interceptor, module adapters) calls ``softmax_attention`` or
``linear_attention`` here, which run the op that the strategy registry (``seqpar.strategies``) gives for the
context's strategy. Outside a context they raise: an attention call that reaches seqpar without a plan would
silently compute local-only attention otherwise.

Activation checkpointing recomputes a block's forward during backward, after ``SPModel.forward`` has left its
context. ``bind_to_backward`` keeps the forward's context reachable for exactly that: when the backward of the
forward's output starts, the context is registered under the autograd graph task running it (until that backward
ends), and ``current_context`` returns it to attention calls made inside that backward, so the recomputed forward
runs the same SP ops (and the same communication) as the original one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from seqpar import custom_ops, strategies

__all__ = ["SPContext", "bind_to_backward", "causal_conv1d", "current_context", "delta_rule_attention",
           "in_sp_step", "linear_attention", "softmax_attention", "sp_context"]


@dataclass
class SPContext:
    """What one forward of one rank runs with.

    Attributes:
        group: this rank's SP group for the step.
        softmax_strategy / linear_strategy: registered strategy names for the softmax and the linear attention
            layers (None: this group was planned without that kind of layer; a call of that kind is an error).
        layout: how tokens were sharded (``zigzag`` or ``contiguous``).
        cu_seqlens: LOCAL int32 boundaries when the batch is packed (input of shape (1, T_local)); None for a
            padded (B, S_local) batch.
        backend: kernel backend.
        max_seqlen: the longest LOCAL sequence of ``cu_seqlens`` (``StepShard.max_seqlen``), passed to the softmax
            op so that no layer reads ``cu_seqlens`` on the host; None for a padded batch (or unknown).
        calls: number of attention calls routed in this forward (a forward with none is an error).
    """

    group: dist.ProcessGroup
    softmax_strategy: str | None
    linear_strategy: str | None
    layout: str
    cu_seqlens: torch.Tensor | None
    backend: str = "auto"
    calls: int = 0
    max_seqlen: int | None = None


_active: list[SPContext] = []
# autograd graph task id -> the context of the forward whose backward that task runs (see bind_to_backward)
_backward_contexts: dict[int, SPContext] = {}


@contextlib.contextmanager
def sp_context(ctx: SPContext) -> Iterator[SPContext]:
    """Make ``ctx`` the context that attention calls route through until the block exits."""
    _active.append(ctx)
    try:
        yield ctx
    finally:
        _active.pop()


def in_sp_step() -> bool:
    """Whether an SP context is current (``current_context() is not None``) without handing out the context:
    what code that torch.compile traces asks, so that Dynamo guards on the context stack's length only, never on
    one step's context object (which would recompile every step)."""
    if _active:
        return True
    return bool(_backward_contexts) and torch._C._current_graph_task_id() in _backward_contexts


def current_context() -> SPContext | None:
    """The innermost active ``SPContext``; inside the backward of a seqpar-parallelized forward (activation
    checkpointing's recomputation), that forward's context; else None."""
    if _active:
        return _active[-1]
    if _backward_contexts:
        return _backward_contexts.get(torch._C._current_graph_task_id())
    return None


def bind_to_backward(ctx: SPContext, output: torch.Tensor) -> None:
    """Make ``ctx`` the context of the backward that runs through ``output`` (the forward's last activation, so
    its hook fires before any block of the forward is recomputed), until that backward finishes."""
    if not output.requires_grad:
        return

    def enter(grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task == -1 or task in _backward_contexts:
            return
        _backward_contexts[task] = ctx
        # runs when this graph task finishes, so the entry never outlives its backward
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _backward_contexts.pop(task, None))

    output.register_hook(enter)


def _require_context(what: str) -> SPContext:
    ctx = current_context()
    if ctx is None:
        raise RuntimeError(
            f"seqpar: {what} was called outside a seqpar-parallelized forward; call the model returned by "
            "seqpar.parallelize(...) with the output of its .prepare(batch)"
        )
    return ctx


def _op(name: str | None, kind: str):
    """The SP op of the registered strategy ``name`` of ``kind``."""
    argument = "strategy" if kind == "softmax" else "linear_strategy"
    if name is None:
        raise ValueError(
            f"{argument}: this step's plan gave the group no {kind} strategy, but the model ran {kind} attention; "
            f"plan with a cost model whose ModelSpec.layer_kinds lists the model's {kind} layers"
        )
    return strategies.get(name, kind, argument=argument).load_op()


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Route one softmax attention call of the model: q (B, S_local, H, D), k (B, S_local, H_kv, D),
    v (B, S_local, H_kv, Dv). ``window`` ((left, right) in global positions, -1 unbounded), ``softcap`` and
    ``sinks`` ((H,) sink logits) go to the op as they are (see ``seqpar.ring_attention``)."""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        # as F.scaled_dot_product_attention under autocast: q, k, v in the autocast dtype (a model's RoPE may leave
        # q, k in float32 and v in bf16), and the op's own precision choices left alone inside
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return softmax_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, scale=scale,
                                     window=window, softcap=softcap, sinks=sinks)
    if torch.compiler.is_compiling():  # one opaque node in the traced graph, this function again at run time
        return custom_ops.softmax_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                            sinks=sinks)
    ctx = _require_context("attention")
    ctx.calls += 1
    op = _op(ctx.softmax_strategy, "softmax")
    options = dict(group=ctx.group, causal=causal, softmax_scale=scale, layout=ctx.layout, backend=ctx.backend)
    # only options in use are passed: a registered op from before them keeps working for models without them
    options.update({name: value for name, value in (("window", window), ("softcap", softcap), ("sinks", sinks))
                    if value is not None})
    if ctx.cu_seqlens is None:
        return op(q, k, v, **options)
    if q.shape[0] != 1:
        raise ValueError(f"q: a packed batch has batch size 1, got {q.shape[0]}")
    return op(q[0], k[0], v[0], cu_seqlens=ctx.cu_seqlens, max_seqlen=ctx.max_seqlen, **options)[None]


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, log_decay: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """Route one linear attention call: q, k (B, S_local, H, Dk), v (B, S_local, H, Dv); ``log_decay`` any kind
    the ops take (None, (H,), (B, S_local, H), (B, S_local, H, Dk)). A packed batch (the context's local
    ``cu_seqlens``) runs as ONE SP call with ``cu_seqlens``: the state resets at every sequence boundary and one
    collective carries every sequence's state."""
    if torch.compiler.is_compiling():
        return custom_ops.linear_attention(q, k, v, log_decay=log_decay, scale=scale)
    ctx = _require_context("linear attention")
    ctx.calls += 1
    if ctx.layout != "contiguous":
        raise ValueError(
            "layout: linear attention needs the contiguous layout (its state flows left to right); "
            "parallelize(..., layout='contiguous') or leave layout='auto'"
        )
    op = _op(ctx.linear_strategy, "linear")
    if ctx.cu_seqlens is None:
        return op(q, k, v, log_decay=log_decay, group=ctx.group, scale=scale)
    return op(q, k, v, log_decay=log_decay, group=ctx.group, scale=scale, cu_seqlens=ctx.cu_seqlens)


def delta_rule_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Route one delta-rule attention call (Gated DeltaNet, KDA; ``seqpar.collectives.delta_rule``): q, k
    (B, S_local, H, Dk) already normalised, v (B, S_local, H, Dv), beta (B, S_local, H), ``log_decay`` None,
    (B, S_local, H) or (B, S_local, H, Dk). Runs the delta-rule variant of the context's linear strategy
    (``Strategy.delta_rule_op``). A packed batch runs as ONE SP call with ``cu_seqlens`` (the state resets at
    every sequence; one collective carries every sequence's state map)."""
    if torch.compiler.is_compiling():
        return custom_ops.delta_rule_attention(q, k, v, beta=beta, log_decay=log_decay, scale=scale)
    ctx = _require_context("delta-rule attention")
    ctx.calls += 1
    if ctx.layout != "contiguous":
        raise ValueError("layout: delta-rule attention needs the contiguous layout (its state flows left to right); "
                         "parallelize(..., layout='contiguous') or leave layout='auto'")
    if ctx.linear_strategy is None:
        _op(None, "linear")  # raises: the plan has no linear strategy
    op = strategies.get(ctx.linear_strategy, "linear", argument="linear_strategy").load_delta_rule_op()
    if ctx.cu_seqlens is None:
        return op(q, k, v, beta, log_decay=log_decay, group=ctx.group, scale=scale)
    return op(q, k, v, beta, log_decay=log_decay, group=ctx.group, scale=scale, cu_seqlens=ctx.cu_seqlens)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Route one depthwise causal conv1d over the sequence (the short conv before q/k/v of Gated DeltaNet, KDA,
    Mamba): x (B, S_local, C), weight (C, w), bias None or (C,) -> (B, S_local, C), no activation. The w - 1
    tokens before this rank's shard come from rank r - 1 (``seqpar.collectives.halo``); a packed batch sends
    every sequence's halo in one exchange, each sequence starting from zeros like the unsharded conv."""
    from seqpar.collectives.halo import causal_conv1d as sharded_conv1d

    if torch.compiler.is_compiling():
        return custom_ops.causal_conv1d(x, weight, bias)
    ctx = _require_context("causal conv1d")
    if ctx.layout != "contiguous":
        raise ValueError("layout: a causal conv1d over shards needs the contiguous layout; "
                         "parallelize(..., layout='contiguous') or leave layout='auto'")
    return sharded_conv1d(x, weight, bias, group=ctx.group, cu_seqlens=ctx.cu_seqlens)
