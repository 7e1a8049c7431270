"""No host reads of ``cu_seqlens`` in a packed SP step: the runtime's hint replaces them.

On a GPU every read of a device tensor's values on the host (``.item()``, ``.tolist()``, ``int()``, ``bool()``)
waits for the device queue to drain; a packed step that reads ``cu_seqlens`` in every kernel call of every layer
serializes the GPU that often. ``seqpar.runtime.packing.pack_sequences`` validates ``cu_seqlens`` once per step
and records ``StepShard.max_seqlen``; the runtime passes it to the SP op (``max_seqlen=``), which derives the
hint of every block it runs (zigzag halves, the gathered global batch) instead of reading boundaries again.

Method: ``HostReadCounter`` is a ``TorchFunctionMode``: it sees every torch function and Tensor method called
while it is active. Autograd runs ``backward`` with the mode stack cleared, so ``counting`` also enters the
counter inside the ``backward`` of every ``torch.autograd.Function`` that seqpar defines (where all of seqpar's
backward logic runs: the SP schedules, the kernel calls, the differentiable collectives). The counter marks the
step's ``cu_seqlens`` as tainted, and taints every integer or bool tensor that a torch function computes from a
tainted tensor (half boundaries, global boundaries, index tensors built from them). It counts calls of ``item``,
``tolist``, ``__int__``, ``__bool__``, ``__index__``, ``__float__``, ``numpy``, ``__repr__`` and ``__format__`` on
tainted tensors, and the ops whose output SIZE depends on a tainted tensor's values (``nonzero``,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, boolean indexing), which sync too on
CUDA. Float tensors are not tainted: gathering q rows by a tainted index reads no index on the host. The counter
is checked to count, in the forward and in the backward: the same step without the hint reads ``cu_seqlens`` there
(validation).

Runs on CPU with the Triton backend under the interpreter (TRITON_INTERPRET=1, set by conftest.py), so the
kernels' own launch code is exercised; every op's output and gradients are checked against a float64 reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import traceback

import pytest
import torch
import torch.distributed as dist
from tests.checks import rel_err
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from tests.harness import run_distributed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__,
    torch.Tensor.__float__, torch.Tensor.numpy, torch.Tensor.__repr__, torch.Tensor.__format__,
}
_SIZE_FROM_VALUES = {
    torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select, torch.unique,
    torch.Tensor.unique, torch.argwhere,
}
_REPEAT = {torch.repeat_interleave, torch.Tensor.repeat_interleave}


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of the tainted tensors and of integer/bool tensors computed from them (see module doc).
    ``phase`` labels each read ("forward" or "backward"); ``shared()`` is a new mode with the same state."""

    def __init__(self, *tainted: torch.Tensor, state: dict | None = None, phase: str = "forward") -> None:
        super().__init__()
        # keep: strong refs, so an id is never reused by a new tensor while counting
        self.state = state if state is not None else {"keep": [], "ids": set(), "reads": []}
        self.phase = phase
        for t in tainted:
            self._taint(t)

    @property
    def reads(self) -> list[str]:
        return self.state["reads"]

    def shared(self, phase: str) -> "HostReadCounter":
        return HostReadCounter(state=self.state, phase=phase)

    def _taint(self, t: torch.Tensor) -> None:
        self.state["keep"].append(t)
        self.state["ids"].add(id(t))

    def _is_tainted(self, x) -> bool:
        return isinstance(x, torch.Tensor) and id(x) in self.state["ids"]

    def _record(self, func) -> None:
        here = [f for f in traceback.extract_stack()[:-3] if "/seqpar/" in f.filename]
        where = f"{here[-1].filename.split('/seqpar/')[-1]}:{here[-1].lineno}" if here else "?"
        self.reads.append(f"{getattr(func, '__name__', func)} in {self.phase} at {where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        tainted_in = any(self._is_tainted(x) for x in inputs)
        if tainted_in:
            if func in _READS and self._is_tainted(args[0]):
                self._record(func)
            elif func in _SIZE_FROM_VALUES or (func in _REPEAT and kwargs.get("output_size") is None):
                self._record(func)
            elif func is torch.Tensor.__getitem__ and any(
                self._is_tainted(x) and x.dtype == torch.bool for x in tree_flatten(args[1:])[0]
            ):
                self._record(func)
        result = func(*args, **kwargs)
        if tainted_in:
            for out in tree_flatten(result)[0]:
                if isinstance(out, torch.Tensor) and not out.dtype.is_floating_point:
                    self._taint(out)
        return result


def _seqpar_autograd_functions() -> list[type]:
    found, todo = [], list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("seqpar.") and "backward" in vars(cls):
            found.append(cls)
    return found


@contextlib.contextmanager
def counting(counter: HostReadCounter):
    """``counter`` active here and inside the backward of every seqpar autograd Function."""
    patched = []
    for cls in _seqpar_autograd_functions():
        original = vars(cls)["backward"]

        def backward(ctx, *grads, _original=original.__func__):
            with counter.shared("backward"):
                return _original(ctx, *grads)

        patched.append((cls, original))
        cls.backward = staticmethod(backward)
    try:
        with counter:
            yield counter
    finally:
        for cls, original in patched:
            cls.backward = original


def packed_step(op_name: str, use_hint: bool, op_options: dict):
    """One packed forward + backward of ``op_name`` with the Triton backend, its inputs made the way the runtime
    makes them (``pack_sequences``); returns (host reads, errors vs the float64 reference, hint, local max)."""
    import seqpar.collectives as collectives
    from seqpar.collectives.layout import shard_sequence
    from seqpar.kernels.reference import reference_attention
    from seqpar.runtime.packing import StepShard, pack_sequences

    p = dist.get_world_size()
    lens = [6 * p, 2 * p, 4 * p]  # zigzag multiples (2P), different lengths: no equal-length fast path
    step = StepShard(group=dist.group.WORLD, group_ranks=tuple(range(p)), softmax_strategy=None,
                     linear_strategy=None, cu_seqlens=None)
    tokens = [torch.zeros(n, dtype=torch.long) for n in lens]
    pack_sequences(tokens, tokens, range(len(lens)), layout="zigzag", step=step, device=torch.device("cpu"))
    cu = torch.tensor([0, 6 * p, 8 * p, 12 * p], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    h, h_kv, d = 4, 2, 16
    q, k, v, dout = (torch.randn(cu[-1].item(), n, d, generator=gen, dtype=torch.float64) for n in (h, h_kv, h_kv, h))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*leaves, causal=True, cu_seqlens=cu)[0]
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    def shard(t):
        return shard_sequence(t, layout="zigzag", cu_seqlens=cu)[0]

    ql, kl, vl = (shard(t).float().requires_grad_(True) for t in (q, k, v))
    local_cu = step.cu_seqlens
    hint = {"max_seqlen": step.max_seqlen} if use_hint else {}
    counter = HostReadCounter(local_cu)
    with counting(counter):
        out = getattr(collectives, op_name)(
            ql, kl, vl, causal=True, layout="zigzag", cu_seqlens=local_cu, backend="triton", **hint, **op_options
        )
        out.backward(shard(dout).float())
    errors = [rel_err(out, shard(ref))] + [rel_err(g, shard(r)) for g, r in zip((ql.grad, kl.grad, vl.grad), ref_grads)]
    return counter.reads, errors, step.max_seqlen, int(torch.diff(local_cu).max())


CASES = [
    pytest.param("ring_attention", 2, {}, id="ring"),
    pytest.param("token_ring_attention", 2, {}, id="token_ring"),
    pytest.param("ulysses_attention", 2, {}, id="ulysses"),
    pytest.param("allgather_kv_attention", 2, {}, id="allgather_kv"),
    pytest.param("usp_attention", 4, {"ulysses_degree": 2}, id="usp"),
]


@pytest.mark.parametrize("op_name, world_size, op_options", CASES)
def test_packed_step_reads_no_cu_seqlens_on_the_host(op_name, world_size, op_options):
    for reads, errors, hint, local_max in run_distributed(packed_step, world_size, op_name, True, op_options):
        assert hint == local_max, "StepShard.max_seqlen must be the longest local sequence"
        assert reads == [], f"{op_name} read cu_seqlens on the host: {reads}"
        assert errors[0] < 1e-5 and max(errors[1:]) < 1e-4, errors


def test_the_counter_counts_the_reads_of_a_step_without_the_hint():
    for reads, errors, _, _ in run_distributed(packed_step, 2, "ring_attention", False, {}):
        # validate_cu_seqlens, at least: in prepare and in every kernel launch, forward and backward
        assert any(r.startswith("tolist in forward") for r in reads), reads
        assert any(r.startswith("tolist in backward") for r in reads), reads
        assert errors[0] < 1e-5 and max(errors[1:]) < 1e-4, errors


def bad_hints():
    import seqpar.collectives as collectives

    q = torch.randn(12, 2, 8)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    messages = {}
    for name, kwargs in {
        "above the tokens": dict(cu_seqlens=cu, max_seqlen=13),
        "not an int": dict(cu_seqlens=cu, max_seqlen=8.0),
        "odd for zigzag": dict(cu_seqlens=cu, max_seqlen=7),
        "without cu_seqlens": dict(max_seqlen=8),
        "int64 cu_seqlens": dict(cu_seqlens=cu.long(), max_seqlen=8),
    }.items():
        x = q if "cu_seqlens" in kwargs else q[None]
        try:
            collectives.ring_attention(x, x, x, causal=True, backend="triton", **kwargs)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    return messages


def test_a_bad_hint_is_a_value_error_naming_the_argument():
    for messages in run_distributed(bad_hints, 1):
        for name, message in messages.items():
            argument = "cu_seqlens:" if name == "int64 cu_seqlens" else "max_seqlen:"
            assert message is not None and message.startswith(argument), (name, message)


def test_triton_varlen_kernels_with_hints_equal_the_reference_and_need_both_hints():
    from seqpar.kernels.attention import attention
    from seqpar.kernels.reference import reference_attention

    gen = torch.Generator().manual_seed(3)
    lengths = [5, 19, 8]
    cu = torch.tensor([0, 5, 24, 32], dtype=torch.int32)
    q, k, v, dout = (torch.randn(32, n, 16, generator=gen, dtype=torch.float64) for n in (4, 2, 2, 4))
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, causal=True, cu_seqlens=cu)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    counter = HostReadCounter(cu)
    with counting(counter):
        out = attention(*leaves, causal=True, backend="triton", cu_seqlens_q=cu, cu_seqlens_k=cu,
                        max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
        out.backward(dout.float())
    assert counter.reads == []
    assert rel_err(out, ref) < 1e-5
    assert max(rel_err(t.grad, g) for t, g in zip(leaves, ref_grads)) < 1e-4
    with pytest.raises(ValueError, match="max_seqlen_k: pass both"):
        attention(*leaves, backend="triton", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=19)
