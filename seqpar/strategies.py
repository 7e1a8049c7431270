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

_USP_ACCUM_BYTES = 4  # the ring's dK/dV accumulators travel in float32
_USP_ALL_TO_ALLS_PER_PASS = 4  # latency charged per inner step and pass, as the cost model charges Ulysses


def usp_ulysses_degree(degree: int, heads: int) -> int:
    """USP's default Ulysses degree u for a group of ``degree`` ranks and ``heads`` query heads: the largest u
    with u < degree (so the ring across inner groups has at least 2 ranks) that divides both the group size and
    the head count; 1 (pure ring) when there is none, and 1 for a group of one."""
    return max((u for u in range(1, degree) if degree % u == 0 and heads % u == 0), default=1)


def _usp_kv_heads(heads: int, kv_heads: int, inner_size: int, inner_rank: int) -> tuple[int, int]:
    """``(n, m)``: the K/V heads inner rank i receives in the all-to-all (those its H/u query heads read) and the
    K/V heads its ring carries (n, or H/u when the query heads do not map onto them regularly)."""
    per_rank, group = heads // inner_size, heads // kv_heads
    kv_of_q = [(inner_rank * per_rank + t) // group for t in range(per_rank)]
    n = len(set(kv_of_q))
    ratio = per_rank // n if per_rank % n == 0 else 0
    regular = ratio and [x - kv_of_q[0] for x in kv_of_q] == [t // ratio for t in range(per_rank)]
    return n, (n if regular else per_rank)


def _usp_rank_bytes(shape: LayerShape, inner_rank: int) -> tuple[Any, Any]:
    P, H, D, b = shape.degree, shape.heads, shape.head_dim, shape.elem_bytes
    u = usp_ulysses_degree(P, H)
    r = P // u
    T = shape.local_tokens
    counts = [_usp_kv_heads(H, shape.kv_heads, u, j) for j in range(u)]
    n, m = counts[inner_rank]
    q_or_out = (u - 1) * T * (H // u) * D * b
    kv_sent = 2 * T * D * b * sum(c[0] for j, c in enumerate(counts) if j != inner_rank)
    ring_kv = (r - 1) * 2 * (u * T) * m * D
    forward = 2 * q_or_out + kv_sent + ring_kv * b
    backward = 2 * q_or_out + (u - 1) * 2 * T * n * D * b + ring_kv * (b + _USP_ACCUM_BYTES)
    return forward, backward


def _usp_comm_bytes(shape: LayerShape) -> tuple[Any, Any]:
    """The busiest rank's bytes: Ulysses on the inner group (P = u) + ring on the outer one (P = r, u*T tokens).
    The formula per rank is in seqpar/collectives/usp.py's docstring; ranks differ only when GQA gives inner
    ranks different numbers of K/V heads, and then this is the rank that sends most forward + backward."""
    import numpy as np

    u = usp_ulysses_degree(shape.degree, shape.heads)
    per_rank = [_usp_rank_bytes(shape, i) for i in range(u)]
    # every term grows linearly with the tokens, so the same rank is the busiest at every length
    return max(per_rank, key=lambda fb: float(np.max(fb[0] + fb[1])))


def _usp_layer_time(shape: LayerShape, compute_fwd_s: Any, compute_bwd_s: Any, link: Link) -> Any:
    """The inner all-to-alls are not overlapped (charged like Ulysses on u ranks); the ring across the r inner
    groups overlaps each K/V transfer with one of its r block kernels (charged like ring on r ranks)."""
    import numpy as np

    P, H, D, b = shape.degree, shape.heads, shape.head_dim, shape.elem_bytes
    u = usp_ulysses_degree(P, H)
    r = P // u
    T = shape.local_tokens
    counts = [_usp_kv_heads(H, shape.kv_heads, u, i) for i in range(u)]
    n, m = max(c[0] for c in counts), max(c[1] for c in counts)
    beta, lam = link.bytes_per_s, link.latency_s
    one_pass = ((u - 1) / u * 2 * T * H * D * b + (u - 1) * 2 * T * n * D * b) / beta
    inner = 2 * (one_pass + _USP_ALL_TO_ALLS_PER_PASS * (u - 1) * lam)
    fwd_step = 2 * (u * T) * m * D * b
    bwd_step = 2 * (u * T) * m * D * (b + _USP_ACCUM_BYTES)
    a_f, a_b = compute_fwd_s / r, compute_bwd_s / r  # one ring step's block
    fwd = a_f + (r - 1) * (np.maximum(a_f, fwd_step / beta) + lam)
    bwd = a_b + (r - 1) * (np.maximum(a_b, bwd_step / beta) + lam)
    return inner + fwd + bwd


def _usp_transient_bytes(shape: LayerShape) -> Any:
    """Ulysses' head-sharded full-length q, k, v, out and their gradients (on u*T tokens, H/u heads), plus the
    ring's double-buffered K/V and float32 dK/dV on the outer group."""
    P, H, D, b = shape.degree, shape.heads, shape.head_dim, shape.elem_bytes
    u = usp_ulysses_degree(P, H)
    T = shape.local_tokens
    m = max(_usp_kv_heads(H, shape.kv_heads, u, i)[1] for i in range(u))
    head_sharded = 2 * (2 * T * H * D * b + 2 * (u * T) * m * D * b)
    ring = 2 * 2 * (u * T) * m * D * (b + _USP_ACCUM_BYTES)
    return head_sharded + ring


def _usp_invalid_reason(degree: int, heads: int, kv_heads: int) -> str | None:
    if usp_ulysses_degree(degree, heads) == 1:
        return (
            f"usp needs a Ulysses degree 1 < u < {degree} dividing both the group size and the {heads} query heads; "
            "there is none, so it would be plain ring: use ring"
        )
    return None


register(
    Strategy(
        name="usp",
        kind="softmax",
        op="seqpar.collectives.usp:usp_attention",
        summary="2-D: Ulysses all-to-all inside consecutive ranks x ring across them (USP)",
        comm_bytes=_usp_comm_bytes,
        layer_time=_usp_layer_time,
        transient_bytes=_usp_transient_bytes,
        min_degree=4,
        invalid_reason=_usp_invalid_reason,
    )
)
