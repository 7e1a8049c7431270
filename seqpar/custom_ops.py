"""seqpar's routed calls as ``torch.library`` custom ops, so that ``torch.compile`` traces THROUGH a model.

Under ``torch.compile`` (``torch.compiler.is_compiling()``), ``seqpar.runtime.softmax_attention`` /
``linear_attention`` / ``delta_rule_attention`` / ``causal_conv1d`` call the ops here instead of running the SP
op: Dynamo sees one opaque node per call (no graph break), shaped by its ``register_fake`` (the output is shaped
like q with v's head dim, in q's dtype; the conv's like x). At run time the node's implementation runs the
routed call eagerly, exactly as without compile: it reads the step's ``SPContext`` (process group, strategies,
layout, ``cu_seqlens`` and the ``max_seqlen`` hint computed once in ``prepare``) from the context stack that
``SPModel.forward`` (which Dynamo does not trace: ``seqpar.wrapper``) entered eagerly. So the graph holds only
tensors, bools, ints and floats, nothing of the step; a new step, or another plan, needs no recompilation.

Backward. The SP ops are autograd graphs of their own (``torch.autograd.Function``s with communication inside, or
differentiable collectives around a kernel), so an op's forward runs them with autograd on (on detached copies
of its tensor inputs) when the traced call needs gradients, and keeps that graph under an integer key; the op
returns the output and the key (a 0-dim int64 CPU tensor, the "handle"). ``register_autograd`` saves the handle,
and the backward node (``seqpar::recorded_backward``, also opaque) runs the kept graph's backward, i.e. the SP
op's own backward with its communication, and drops it. A kept graph lives exactly as long as the handle: a
forward whose backward never runs (the loss dropped, eval under grad) frees it with its autograd graph.

The output is a copy of the SP op's output, not a view of it: the op saves its output for its backward (the
out/LSE merge), and Inductor may reuse an output's buffer once the compiled code is done with it.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch._C import DispatchKey

__all__ = ["causal_conv1d", "delta_rule_attention", "kept_graphs", "linear_attention", "softmax_attention"]

# handle -> (the SP op's output with its autograd graph, the detached inputs it was computed from)
_KEPT: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
_next_handle = itertools.count()


def kept_graphs() -> int:
    """How many forward graphs wait for their backward (for tests: 0 after every backward, or graph freed)."""
    return len(_KEPT)


def _autograd_on():
    """Autograd recording inside an op implementation. The dispatcher runs a custom op's implementation below the
    autograd key (``AutogradFunctionality`` in the thread's excluded keys), where ops record no graph even with
    grad mode on; the kept graph needs them recorded."""
    excluded = torch._C._dispatch_tls_local_exclude_set().remove(DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def _run(call: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
         record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``call(*inputs)`` -> (a copy of its output, handle); with ``record``, its autograd graph is kept under the
    handle for ``recorded_backward``."""
    key = next(_next_handle)
    handle = torch.tensor(key, dtype=torch.int64)
    if not record:
        with torch.no_grad():
            return _unaliased(call(*inputs), _storages(inputs)), handle
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    with _autograd_on(), torch.enable_grad():
        out = call(*leaves)
    _KEPT[key] = (out, [t for t in leaves if t is not None])
    weakref.finalize(handle, _KEPT.pop, key, None)
    return out.detach().clone(), handle


@torch.library.custom_op("seqpar::recorded_backward", mutates_args=())
def _recorded_backward(handle: torch.Tensor, grad_out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of the kept forward ``handle`` names with respect to its tensor inputs (``inputs``: those
    inputs, for their shapes), given the output's gradient; the kept graph is released."""
    kept = _KEPT.pop(int(handle), None)
    if kept is None:
        raise RuntimeError("seqpar: the backward of a compiled seqpar call ran twice, or after its graph was freed; "
                           "call backward once per forward (retain_graph is not supported under torch.compile)")
    out, leaves = kept
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    # a custom op's outputs may alias neither its inputs nor each other (an SP op may return dk, dv as views of
    # one buffer, or pass a gradient through): copy those
    taken = _storages([grad_out, *inputs])
    results = []
    for g, t in zip(grads, leaves):
        g = _unaliased(torch.zeros_like(t) if g is None else g, taken)
        taken.add(g.untyped_storage().data_ptr())
        results.append(g)
    return results


def _storages(tensors: Sequence[torch.Tensor | None]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


def _unaliased(t: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """``t``, or a copy of it where it shares memory with one of ``storages``."""
    return t.clone() if t.untyped_storage().data_ptr() in storages else t


@_recorded_backward.register_fake
def _(handle, grad_out, inputs):
    return [torch.empty_like(t) for t in inputs]


def _register_autograd(op, tensor_arguments: int) -> None:
    """Backward of an op whose first ``tensor_arguments`` arguments are (optional) tensors and whose outputs are
    (out, handle): run the kept graph's backward; None for the absent optional tensors."""

    def setup_context(ctx, inputs, output):
        present = [t for t in inputs[:tensor_arguments] if t is not None]
        ctx.present = [t is not None for t in inputs[:tensor_arguments]]
        ctx.trailing = len(inputs) - tensor_arguments
        ctx.save_for_backward(output[1], *present)

    def backward(ctx, grad_out, _grad_handle):
        handle, *present = ctx.saved_tensors
        grads = iter(_recorded_backward(handle, grad_out.contiguous(), present))
        return (*(next(grads) if p else None for p in ctx.present), *([None] * ctx.trailing))

    op.register_autograd(backward, setup_context=setup_context)


# ------------------------------------------------------------------------------------------------------------
# the routed calls (their implementations call seqpar.runtime, which is not compiling at run time)
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("seqpar::softmax_attention", mutates_args=())
def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Optional[torch.Tensor],
                       causal: bool, scale: Optional[float], window: Optional[list[int]], softcap: Optional[float],
                       record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from seqpar import runtime

    def call(q, k, v, sinks):
        return runtime.softmax_attention(q, k, v, causal=causal, scale=scale, softcap=softcap, sinks=sinks,
                                         window=None if window is None else (window[0], window[1]))

    return _run(call, (q, k, v, sinks), record)


@_softmax_attention.register_fake
def _(q, k, v, sinks, causal, scale, window, softcap, record):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), torch.empty((), dtype=torch.int64)


_register_autograd(_softmax_attention, 4)


@torch.library.custom_op("seqpar::linear_attention", mutates_args=())
def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                      scale: Optional[float], record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from seqpar import runtime

    return _run(lambda q, k, v, g: runtime.linear_attention(q, k, v, log_decay=g, scale=scale),
                (q, k, v, log_decay), record)


@_linear_attention.register_fake
def _(q, k, v, log_decay, scale, record):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), torch.empty((), dtype=torch.int64)


_register_autograd(_linear_attention, 4)


@torch.library.custom_op("seqpar::delta_rule_attention", mutates_args=())
def _delta_rule_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                          log_decay: Optional[torch.Tensor], scale: Optional[float],
                          record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from seqpar import runtime

    return _run(lambda q, k, v, b, g: runtime.delta_rule_attention(q, k, v, beta=b, log_decay=g, scale=scale),
                (q, k, v, beta, log_decay), record)


@_delta_rule_attention.register_fake
def _(q, k, v, beta, log_decay, scale, record):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), torch.empty((), dtype=torch.int64)


_register_autograd(_delta_rule_attention, 5)


@torch.library.custom_op("seqpar::causal_conv1d", mutates_args=())
def _causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from seqpar import runtime

    return _run(runtime.causal_conv1d, (x, weight, bias), record)


@_causal_conv1d.register_fake
def _(x, weight, bias, record):
    return torch.empty_like(x), torch.empty((), dtype=torch.int64)


_register_autograd(_causal_conv1d, 3)


# ------------------------------------------------------------------------------------------------------------
# what seqpar.runtime calls while Dynamo traces
# ------------------------------------------------------------------------------------------------------------


def _record(*tensors: torch.Tensor | None) -> bool:
    """Whether the call needs its backward: grad mode on and some input requiring grad (static while tracing)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
                      window: tuple[int, int] | None = None, softcap: float | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``seqpar.runtime.softmax_attention`` as one ``seqpar::softmax_attention`` node: q (B, S_local, H, D),
    k (B, S_local, H_kv, D), v (B, S_local, H_kv, Dv) -> (B, S_local, H, Dv) in q's dtype."""
    out, _ = _softmax_attention(q, k, v, sinks, causal, None if scale is None else float(scale),
                                None if window is None else [int(window[0]), int(window[1])],
                                None if softcap is None else float(softcap), _record(q, k, v, sinks))
    return out


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, log_decay: torch.Tensor | None,
                     scale: float | None) -> torch.Tensor:
    """``seqpar.runtime.linear_attention`` as one ``seqpar::linear_attention`` node (shapes there)."""
    out, _ = _linear_attention(q, k, v, log_decay, None if scale is None else float(scale),
                               _record(q, k, v, log_decay))
    return out


def delta_rule_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                         log_decay: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """``seqpar.runtime.delta_rule_attention`` as one ``seqpar::delta_rule_attention`` node (shapes there)."""
    out, _ = _delta_rule_attention(q, k, v, beta, log_decay, None if scale is None else float(scale),
                                   _record(q, k, v, beta, log_decay))
    return out


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``seqpar.runtime.causal_conv1d`` as one ``seqpar::causal_conv1d`` node: x (B, S_local, C) -> like x."""
    out, _ = _causal_conv1d(x, weight, bias, _record(x, weight, bias))
    return out
