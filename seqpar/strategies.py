"""The strategy registry: every SP algorithm seqpar can run, described once.

Pure Python (numpy only): the solver imports it without torch.distributed. Each ``Strategy`` says what the
algorithm is (name, attention kind, the op that runs it, where it is valid) and what it costs (the bytes each
rank sends per layer forward and backward, its time given the layer's compute and the link, the transient
memory it holds while a layer runs). The cost model, the planner, the runtime, ``parallelize``, ``seqpar-train``
and the benchmarks all read this table; adding an algorithm means adding its op file, its entry here and its
tests.

Formulas take a ``LayerShape`` whose ``seq_len`` may be a numpy array (many sequences at once) and return
numbers or arrays of the same shape.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "KINDS",
    "LayerShape",
    "Link",
    "Strategy",
    "get",
    "names",
    "register",
]

KINDS = ("softmax", "linear")


@dataclass(frozen=True)
class LayerShape:
    """One attention layer of one sequence on one rank of an SP group, as the formulas see it.

    Attributes:
        seq_len: S, the sequence's tokens (a float or a numpy array of them).
        degree: P, the SP group's size.
        heads, kv_heads, head_dim: H, H_kv, D (linear attention: D_k = D_v = D).
        elem_bytes: b, the element size of q/k/v and of what travels in the model dtype.
        state_bytes: one linear-attention state as the collectives send it (H * D_k * D_v * 4).
    """

    seq_len: Any
    degree: int
    heads: int
    kv_heads: int
    head_dim: int
    elem_bytes: float
    state_bytes: float = 0.0

    @property
    def local_tokens(self) -> Any:
        """s = S / P."""
        return self.seq_len / self.degree


@dataclass(frozen=True)
class Link:
    """What one transfer costs: ``bytes_per_s`` per direction and ``latency_s`` per message or collective step."""

    bytes_per_s: float
    latency_s: float


def _always_valid(degree: int, heads: int, kv_heads: int) -> str | None:
    return None


@dataclass(frozen=True)
class Strategy:
    """One SP algorithm.

    Attributes:
        name: what users and plans call it (``"ring"``).
        kind: ``"softmax"`` or ``"linear"``: which attention layers it serves.
        op: ``"module:function"`` of the SP op; the function takes local shards and the keyword arguments of
            its kind (softmax: ``group, causal, softmax_scale, layout, cu_seqlens, backend``; linear:
            ``log_decay, group, scale, layout, backend``).
        summary: one line for docs and ``--help``.
        comm_bytes: ``(shape) -> (forward, backward)`` bytes one rank sends for one layer; equal to what
            ``seqpar.count_comm`` records for the op.
        layer_time: ``(shape, compute_fwd_s, compute_bwd_s, link) -> seconds`` of one layer forward + backward on
            one rank, where ``compute_*`` is the layer's attention compute on this rank (already divided by P).
        transient_bytes: ``(shape) -> bytes`` the op holds on one rank while a layer runs, beyond activations.
        layouts: token layouts it accepts.
        min_degree: the smallest group size it is meant for (1: it also runs alone).
        invalid_reason: ``(degree, heads, kv_heads) -> str | None``: why it cannot run at this degree with
            these head counts (None: it can).
    """

    name: str
    kind: str
    op: str
    summary: str
    comm_bytes: Callable[[LayerShape], tuple[Any, Any]]
    layer_time: Callable[[LayerShape, Any, Any, Link], Any]
    transient_bytes: Callable[[LayerShape], Any]
    layouts: tuple[str, ...] = ("zigzag", "contiguous")
    min_degree: int = 1
    invalid_reason: Callable[[int, int, int], str | None] = _always_valid

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {KINDS}, got {self.kind!r}")
        if ":" not in self.op:
            raise ValueError(f"op: expected 'module:function', got {self.op!r}")

    def valid(self, degree: int, heads: int, kv_heads: int) -> bool:
        return degree >= self.min_degree and self.invalid_reason(degree, heads, kv_heads) is None

    def load_op(self) -> Callable[..., Any]:
        """Import and return the SP op (this imports torch.distributed)."""
        module, attr = self.op.split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy (a name may be registered once)."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"name: strategy {strategy.name!r} is already registered")
    _REGISTRY[strategy.name] = strategy
    return strategy


def names(kind: str | None = None) -> tuple[str, ...]:
    """Registered strategy names, in registration order, of one ``kind`` or all."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS} or None, got {kind!r}")
    return tuple(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get(name: str, kind: str | None = None, *, argument: str = "strategy") -> Strategy:
    """The strategy called ``name`` (of ``kind`` when given).

    Raises:
        ValueError: naming ``argument``, when no such strategy (of that kind) is registered.
    """
    strategy = _REGISTRY.get(name) if isinstance(name, str) else None
    if strategy is None or (kind is not None and strategy.kind != kind):
        raise ValueError(f"{argument}: unknown {kind + ' ' if kind else ''}strategy {name!r}; choose one of {names(kind)}")
    return strategy


# ----------------------------------------------------------------------------------------------------
# Softmax attention
# ----------------------------------------------------------------------------------------------------

# (ring, token_ring, ulysses, allgather_kv entries)


# ----------------------------------------------------------------------------------------------------
# Linear attention
# ----------------------------------------------------------------------------------------------------

# (lasp2, zeco entries)


# ----------------------------------------------------------------------------------------------------
# 2-D: USP (Ulysses inside consecutive ranks x ring across them)
# ----------------------------------------------------------------------------------------------------

# (usp entry)
